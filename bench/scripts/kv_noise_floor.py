"""How often does a model's greedy next token change when its KV changes by rounding alone?

Teacher-forced decode of real prose after an exactly prefilled prompt, full attention, the
model in fp32 and in bf16. Against the prompt prefilled in 2048-token pieces (what kvdrive
does), each row changes one thing:

- ``pieces_512``: the prompt prefilled in 512-token pieces. The same arithmetic in another
  order: the KV differs by the model dtype's rounding, nothing else.
- ``fp8`` / ``int8`` / ``int4``: the 2048-token prefill, each full group's KV through the
  storage format's round trip (``SparseConfig.kv_dtype``, what a fetch from compressed tiers
  delivers).

Top-1 agreement with the reference's greedy tokens (95% Wilson interval), KL and the
perplexity change. Where ``pieces_512`` itself flips tokens, that rate is the floor any
compressed format is measured against in that dtype.

    python3 bench/scripts/kv_noise_floor.py OUT.json [--length 4096] [--samples 8] [--steps 64]
"""

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from kvdrive.cache.sparse import SparseConfig
from kvdrive.eval import corpus
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.metrics import compare_logits
from kvdrive.eval.retrieval import wilson
from kvdrive.eval.run import text_rows
from kvdrive.models.loader import load_model
from kvdrive.results import write_result


def decode(runner: Runner, rows: list[list[int]], context: int, kv_dtype: str = "bf16") -> torch.Tensor:
    """Full attention over the prefilled prompts, rewound to them, KV through ``kv_dtype``."""
    runner.use(Setting(None, 1.0, kv_dtype=kv_dtype), [context] * len(rows))
    return runner.decode(torch.tensor([r[context:-1] for r in rows])).cpu()


def compare(ref: torch.Tensor, test: torch.Tensor, target: torch.Tensor) -> dict:
    row = compare_logits(ref, test, target).to_dict()
    agree = int(round(row["top1_agreement"] * row["tokens"]))
    row["top1_interval"] = list(wilson(agree, row["tokens"]))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--text", default="kjv")
    args = p.parse_args()
    ids = None
    results = {}
    for dtype in args.dtypes:
        lm = load_model(args.model, device="cpu", dtype=getattr(torch, dtype))
        if ids is None:
            text = corpus.load_text(args.text, fetch_missing=True)
            ids = lm.tokenizer(text.text, add_special_tokens=False)["input_ids"]
        rows = text_rows(ids, args.length, args.steps, args.samples, random.Random(0))
        target = torch.tensor([r[args.length + 1 :] for r in rows])
        max_len = args.length + args.steps + 8
        t0 = time.perf_counter()
        runs = {}
        for chunk in (512, 2048):
            runner = Runner(lm, args.samples, max_len, SparseConfig(), chunk=chunk)
            runner.prefill([r[: args.length] for r in rows])
            runs[f"pieces_{chunk}"] = decode(runner, rows, args.length)
        ref = runs.pop("pieces_2048")
        for fmt in ("fp8", "int8", "int4"):  # over the 2048-piece prefill
            runs[fmt] = decode(runner, rows, args.length, fmt)
        results[dtype] = {name: compare(ref, logits, target) for name, logits in runs.items()}
        results[dtype]["seconds"] = time.perf_counter() - t0
        print(dtype, {k: v["top1_agreement"] for k, v in results[dtype].items() if k != "seconds"}, flush=True)
    config = {k: getattr(args, k) for k in ("model", "length", "samples", "steps", "dtypes", "text")}
    config["device"] = "cpu"
    notes = ["reference: full attention, the prompt prefilled in 2048-token pieces, KV in the model dtype"]
    write_result(args.out, "kv_noise_floor", config, results, notes)


if __name__ == "__main__":
    main()
