"""``kvdrive bench model``: decode tokens/s of kvdrive's runner with the plain GPU cache
(``--cache``: ``paged``, the one ``LLM`` uses, or ``contiguous``, the reference), beside
Hugging Face transformers ``generate`` on the same weights, in one run.

Both sides share the very same weight tensors. Decode speed is measured the same
way for both: time of (prefill + N+1 tokens) minus time of (prefill + 1 token),
so prefill is excluded and each side pays its own per-step overheads.
"""

from __future__ import annotations

import time

import torch

from kvdrive import device as devices
from kvdrive.commands.common import BENCH_MODEL, add_model_options
from kvdrive.progress import progress
from kvdrive.results import write_result


def add_arguments(p) -> None:
    add_model_options(p, default=BENCH_MODEL)
    p.add_argument("-c", "--context", type=int, default=4096, help="prompt tokens per sequence (default 4096)")
    p.add_argument("-b", "--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("-n", "--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is kept (default 3)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument(
        "--cache",
        choices=list(CACHES),
        default="paged",
        help="kvdrive's plain cache: paged (PagedKVCache, what LLM uses; default) or contiguous (ContiguousKVCache)",
    )
    p.add_argument("-o", "--out", default="bench/results/model.json", help="JSON result path")


def _median_time(fn, repeats: int, dev) -> float:
    times = []
    for _ in range(repeats):
        devices.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        devices.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _cache_class(name: str):
    if name == "paged":
        from kvdrive.cache.paged import PagedKVCache

        return PagedKVCache
    from kvdrive.cache.contiguous import ContiguousKVCache

    return ContiguousKVCache


CACHES = {"paged": "PagedKVCache", "contiguous": "ContiguousKVCache"}


def _kvdrive_generate(
    model, prompts: torch.Tensor, new_tokens: int, cuda_graphs: bool = True, cache: str = "paged"
) -> list[list[int]]:
    """Greedy through the engine's own loop: prefill each sequence, then decode the batch."""
    from kvdrive.engine import generation
    from kvdrive.engine.sampling import SamplingParams

    b, t = prompts.shape
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    reqs = [generation.Request(i, prompts[i].tolist(), params, new_tokens) for i in range(b)]
    cache = _cache_class(cache)(model.config, b, t + new_tokens, model.device, model.dtype)
    for _ in generation.run(model, cache, reqs, (), None, cuda_graphs=cuda_graphs):
        pass
    return [r.output_ids for r in reqs]


def hf_model(loaded):
    from transformers import AutoModelForCausalLM

    from kvdrive.models import presets

    spec = loaded.source.split(" ")[0]
    if not spec.startswith("random:"):
        return None
    hf_cfg = presets.hf_config(spec.removeprefix("random:"))
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, RoPE buffers real
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=loaded.model.dtype)
    hf.load_state_dict(loaded.model.state_dict(), assign=True, strict=False)
    hf.tie_weights()
    return hf.to(loaded.model.device).eval()


def decode_rate(gen, prompts, new_tokens, repeats, dev) -> dict:
    gen(prompts, 2)  # warm-up: kernels, allocator, cuBLAS handles
    t1 = _median_time(lambda: gen(prompts, 1), repeats, dev)
    tn = _median_time(lambda: gen(prompts, new_tokens + 1), repeats, dev)
    step = (tn - t1) / new_tokens
    return {
        "prefill_plus_first_token_s": t1,
        "decode_step_ms": step * 1e3,
        "decode_tokens_per_s": prompts.shape[0] / step,
    }


def run(args) -> int:
    from kvdrive.models.loader import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, dev = loaded.model, loaded.model.device
    hf = None if args.no_transformers else hf_model(loaded)
    gen = torch.Generator().manual_seed(0)
    results = []
    for b in progress(args.batches, desc="batches"):
        prompts = torch.randint(0, model.config.vocab_size, (b, args.context), generator=gen).to(dev)
        row = {"batch": b, "context": args.context}
        ours = decode_rate(
            lambda p, n: _kvdrive_generate(model, p, n, cache=args.cache), prompts, args.new_tokens, args.repeats, dev
        )
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            _kvdrive_generate(model, prompts, args.new_tokens, cache=args.cache)
            ours["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        row["kvdrive"] = ours
        if dev.type == "cuda":
            row["kvdrive_eager"] = decode_rate(
                lambda p, n: _kvdrive_generate(model, p, n, cuda_graphs=False, cache=args.cache),
                prompts,
                args.new_tokens,
                args.repeats,
                dev,
            )
            graphed = _kvdrive_generate(model, prompts, 8, cache=args.cache)
            eager = _kvdrive_generate(model, prompts, 8, False, cache=args.cache)
            row["graph_vs_eager_tokens_agree"] = sum(x == y for g, e in zip(graphed, eager) for x, y in zip(g, e)) / (
                8 * b
            )
        if hf is not None:

            def hf_gen(p, n):
                with torch.inference_mode():
                    return hf.generate(
                        p,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        attention_mask=torch.ones_like(p),
                        pad_token_id=0,
                    )

            theirs = decode_rate(hf_gen, prompts, args.new_tokens, args.repeats, dev)
            row["transformers"] = theirs
            row["speedup_vs_transformers"] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
            if b == 1:
                a = _kvdrive_generate(model, prompts, 16, cache=args.cache)[0]
                h = hf_gen(prompts, 16)[0, args.context :].tolist()
                row["greedy_tokens_agree_first16"] = sum(x == y for x, y in zip(a, h)) / 16
        results.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    config = {
        "model": loaded.source,
        "dtype": str(model.dtype),
        "device": str(dev),
        "context": args.context,
        "batches": args.batches,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "kv_cache": f"{CACHES[args.cache]} (all KV on the GPU); kvdrive = CUDA-graph decode, kvdrive_eager = without",
        "transformers_cache": "DynamicCache, sdpa",
    }
    notes = [
        "random weights of the real architecture's shape" if loaded.random_weights else "real weights",
        "decode step = (time of prefill + N+1 tokens - time of prefill + 1 token) / N, median of repeats",
    ]
    path = write_result(args.out, "model", config, results, notes)
    print(f"wrote {path}")
    return 0
