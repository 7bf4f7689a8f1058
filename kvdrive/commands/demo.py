"""``kvdrive demo``: the main job on the embedded model, end to end, with timings."""

from __future__ import annotations

import sys
import time

from kvdrive.commands.common import add_model_options, human_bytes, number

DEMO_PROMPT = "In three short sentences, explain why long documents make LLM inference memory-hungry."


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the embedded model on a sample prompt and report speed and KV size",
        description=(
            "Load the embedded default model (SmolLM2-135M-Instruct; no download), answer a sample chat "
            "prompt while streaming the tokens, then report load time, prefill and decode speed and the KV "
            "cache it used."
        ),
    )
    add_model_options(p)
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the question to ask (default: a sample)")
    p.add_argument(
        "-n", "--max-tokens", type=number(int, 1, example="64"), default=96, help="most tokens to generate (default 96)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from kvdrive.engine.llm import LLM
    from kvdrive.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    t0 = time.perf_counter()
    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    print(
        f"model: {llm.loaded.source}, {llm.config.architecture}, {llm.config.num_parameters() / 1e6:.0f} M "
        f"parameters, on {llm.model.device} in {str(llm.model.dtype).removeprefix('torch.')} "
        f"(loaded in {load_s:.1f} s)",
        file=sys.stderr,
    )
    has_chat = llm.tokenizer is not None and getattr(llm.tokenizer, "chat_template", None)
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if has_chat else args.prompt
    print(f"> {args.prompt}\n", file=sys.stderr)
    n_prompt = len(llm.encode(prompt)[1])
    t0 = time.perf_counter()
    first, n_out = None, 0
    for event in llm.stream_events(prompt, params):
        first = first or time.perf_counter()
        n_out += 1
        sys.stdout.write(event.text_delta)
        sys.stdout.flush()
    end = time.perf_counter()
    kv = llm.config.kv_bytes_at(n_prompt + n_out, llm.model.dtype)
    print(
        f"\n\nprompt {n_prompt} tokens, output {n_out} tokens; time to first token {first - t0:.2f} s, "
        f"decode {max(n_out - 1, 1) / max(end - first, 1e-9):.1f} tok/s; KV cache {human_bytes(kv)}",
        file=sys.stderr,
    )
    return 0
