"""Which layers find the pass key: per layer, how often the selection holds the key's digits.

Pass-key items of the retrieval suite are prefilled exactly (context and question); then the
true answer is teacher-forced one token at a time under each summary at one budget, through
the GPU-resident sparse cache (the selection the product runs). After every step that must
emit a digit, each sparse layer's selection is checked for the group(s) holding the key's
digits. Prints a table (layer x summary) and writes JSON.

    python bench/scripts/needle_recall.py --length 4096 --items 20 -o needle-recall.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from kvdrive.cache.sparse import SparseConfig
from kvdrive.eval import corpus, retrieval
from kvdrive.eval.harness import FULL_BUDGET, Runner
from kvdrive.models.loader import load_model
from kvdrive.results import write_result


def digit_groups(tokenizer, item: retrieval.Item, group_tokens: int) -> set[int]:
    """Groups of the asked fact's tokens that spell the answer's digits."""
    start, end = item.span
    pos = [p for p in range(start, end) if tokenizer.decode([item.context_ids[p]]).strip().isdigit()]
    return {p // group_tokens for p in pos}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--items", type=int, default=20)
    p.add_argument("--budget", type=float, default=0.0625)
    p.add_argument("--summaries", nargs="+", default=["mean", "tokenmax", "oracle"])
    p.add_argument("--text", default="kjv")
    p.add_argument("-o", "--out", default="needle-recall.json")
    args = p.parse_args()
    lm = load_model(args.model, device=args.device)
    text = corpus.load_text(args.text, fetch_missing=True)
    items = retrieval.Builder(lm.tokenizer, text.text).build("passkey", args.length, args.items)
    layers = list(lm.config.global_layers)
    base = SparseConfig()
    runner = Runner(lm, 1, args.length + 16, base)
    hits = {s: [0] * len(layers) for s in args.summaries}
    right = {s: 0 for s in ["full", *args.summaries]}
    steps = 0
    for n, item in enumerate(items):
        answer = lm.tokenizer.encode(" " + item.answer, add_special_tokens=False)
        groups = digit_groups(lm.tokenizer, item, base.group_tokens)
        runner.prefill([list(item.prompt_ids)])
        prompt = len(item.prompt_ids)
        for s in ["full", *args.summaries]:
            runner.cache.reconfigure(
                replace(base, budget=FULL_BUDGET) if s == "full" else replace(base, summary=s, budget=args.budget)
            )
            runner.cache.truncate(0, prompt)
            greedy = []
            for t, tok in enumerate(answer[:-1]):  # teacher-forced: the input of step t is answer[t]
                logits = runner.decode(torch.tensor([[tok]]))[0, -1]
                greedy.append(int(logits.argmax()))
                if s != "full" and lm.tokenizer.decode([answer[t + 1]]).strip().isdigit():
                    for i, layer in enumerate(layers):
                        sel = runner.cache.last_selection[layer]
                        chosen = set(sel.groups[0, 0, : int(sel.num_pages[0])].tolist())
                        hits[s][i] += bool(groups & chosen)
                    steps += s == args.summaries[0]
            right[s] += greedy == answer[1:]
        print(f"item {n}: depth {item.depth:.2f}", file=sys.stderr, flush=True)
    recall = {s: [h / steps for h in hits[s]] for s in args.summaries}
    print("layer " + " ".join(f"{s:>9s}" for s in args.summaries))
    for i, layer in enumerate(layers):
        print(f"{layer:5d} " + " ".join(f"{recall[s][i]:9.2f}" for s in args.summaries))
    print("mean  " + " ".join(f"{sum(recall[s]) / len(layers):9.2f}" for s in args.summaries))
    print("answers right (teacher-forced digits):", right)
    config = {
        **vars(args),
        "model": lm.source,
        "text_source": text.source,
        "group_tokens": base.group_tokens,
        "sink_tokens": base.sink_tokens,
        "window_tokens": base.window_tokens,
    }
    results = {"layers": layers, "recall": recall, "digit_steps": steps, "answers_right": right, "items": len(items)}
    notes = [
        "recall: share of the steps that must emit a digit of the key at which the layer's selection holds "
        "a group with the key's digits; context and question prefilled exactly, the answer teacher-forced",
        "answers_right: items whose every teacher-forced step predicted the next answer token",
    ]
    write_result(args.out, "needle-recall", config, results, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
