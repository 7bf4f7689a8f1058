"""``kvdrive generate``: one prompt in, generated text out (streamed)."""

from __future__ import annotations

import json
import sys

from kvdrive.commands.common import (
    KV_DTYPES,
    PREFILL_CHUNK,
    add_model_options,
    budget_value,
    number,
    parse_cache_tokens,
)
from kvdrive.errors import KvdriveError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text for a prompt",
        description=(
            "Generate text for one prompt, streaming tokens as they come. The prompt comes from the "
            "PROMPT argument, from --file, or from standard input ('-' or no PROMPT with a pipe). Chat "
            "models get the tokenizer's chat template unless --raw is given."
        ),
    )
    p.add_argument("prompt", nargs="?", help="the prompt text; '-' reads standard input")
    p.add_argument("-f", "--file", help="read the prompt from this file")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument(
        "--max-model-len",
        type=number(int, 1, example="4096"),
        help="cap on prompt + output tokens (default: model context)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=number(int, 1, example="2048"),
        default=PREFILL_CHUNK,
        metavar="TOKENS",
        help=f"prompt tokens per prefill forward (default {PREFILL_CHUNK}); a long prompt in one chunk is "
        "the fastest prefill where GPU memory holds its activations (about 131 KB a token for an 8B model)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, finish reason)")
    p.set_defaults(func=run)


def add_sampling_options(p) -> None:
    k = p.add_argument_group(
        "KV cache",
        "Where the KV lives. Default: all of it on the device. --budget turns on "
        "the tiered cache: every token's KV in pinned host memory (and on disk with "
        "--disk), decode attending to the budget's best groups through a GPU cache.",
    )
    k.add_argument(
        "--budget",
        type=budget_value,
        help="tokens attended per decode step (sinks and window included), a fraction of the context "
        "if < 1, or auto: the smallest budget measured to keep the model's retrieval within 2 points of "
        "full attention and its top-1 agreement at 95%% (0.375 for SmolLM2, 0.5 for Gemma 3 and for "
        "models not measured; docs/eval.md); smaller budgets and token counts such as 2048 are faster "
        "on long contexts and less accurate",
    )
    k.add_argument(
        "--gpu-cache-tokens",
        type=parse_cache_tokens,
        default="auto",
        metavar="TOKENS|auto",
        help="GPU selection cache per sequence and layer, in tokens (default auto: 80%% of the free GPU "
        "memory, split over the batch; 4096 on CPU). Larger is faster (more of each step's selection "
        "is already there; docs/tiered.md); it costs this many tokens of KV per sequence "
        "(Llama-3.1-8B: 4096 tokens = 512 MiB). "
        "The batch is capped to what free GPU memory holds",
    )
    k.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="DIR",
        help="keep the KV on this directory too (repeatable: striped); needs --host-gib",
    )
    k.add_argument(
        "--disk-gib",
        type=number(float, 0, above=True, example="64"),
        default=64.0,
        help="disk budget per --disk directory (default 64)",
    )
    k.add_argument(
        "--host-gib",
        type=number(float, 0, above=True, example="8"),
        help="pinned host arena in front of the disks, GiB",
    )
    # TieredConfig.disk_misses' choices, spelled here: importing it would load torch for --help
    k.add_argument(
        "--disk-misses",
        choices=("wait", "defer"),
        default="wait",
        help="with --disk, selected groups that are only on disk: wait reads them before the layer "
        "attends (exact; on a GPU every layer that needs the disk waits for it), defer leaves them "
        "out of that step and reads them for the next ones (no waits, CUDA graphs; not exact: the "
        "step attends without those groups; speed and agreement: docs/tiered.md) "
        "(default wait)",
    )
    k.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default="bf16",
        help="with --budget, the storage format of the host and disk tiers: fp8, int8 or int4 store full groups "
        "quantized (the same host and disk bytes hold ~1.6x (fp8, int8) / ~2.6x (int4) the tokens at 16-token "
        "groups; int8 is the most accurate per byte, docs/compression.md) (default bf16: the model dtype)",
    )
    g = p.add_argument_group("sampling")
    g.add_argument(
        "-n",
        "--max-tokens",
        type=number(int, 1, example="64"),
        default=256,
        help="most tokens to generate (default 256)",
    )
    g.add_argument(
        "-t",
        "--temperature",
        type=number(float, 0, example="0.7"),
        default=0.0,
        help="0 = greedy (default); higher = more random",
    )
    g.add_argument(
        "--top-p",
        type=number(float, 0, 1, above=True, example="0.95"),
        default=1.0,
        help="nucleus sampling mass in (0, 1] (default 1 = off)",
    )
    g.add_argument(
        "--top-k", type=number(int, -1, example="50"), default=0, help="sample among the k most likely tokens (0 = off)"
    )
    g.add_argument("--seed", type=number(int, 0, 2**64 - 1, example="1"), help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def sampling_params(args):
    from kvdrive.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def tiered_config(args):
    """The tiered cache's config from --budget/--disk/--host-gib, or None (all KV on the device)."""
    if args.budget is None:
        if args.disk or args.host_gib:
            raise KvdriveError("--disk and --host-gib belong to the tiered cache: add --budget (e.g. --budget auto)")
        if args.kv_dtype != "bf16":
            raise KvdriveError("--kv-dtype is the tiered cache's storage format: add --budget (e.g. --budget auto)")
        return None
    from kvdrive.cache.sparse import SparseConfig
    from kvdrive.storage.pool import PoolPath
    from kvdrive.tiered.cache import TieredConfig

    if args.disk and not args.host_gib:
        raise KvdriveError("--disk needs --host-gib: the pinned host arena in front of the disks (e.g. --host-gib 8)")
    if args.host_gib and not args.disk:
        raise KvdriveError(
            "--host-gib sizes the arena in front of --disk directories: add --disk DIR, or drop it "
            "(without --disk every token's KV is in host memory)"
        )
    from kvdrive.storage.pool import check_dir

    for d in args.disk:
        check_dir(d)
    disk = tuple(PoolPath(d, int(args.disk_gib * 2**30)) for d in args.disk)
    return TieredConfig(
        SparseConfig(budget=None if args.budget == "auto" else args.budget, sink_tokens=64, window_tokens=256),
        cache_tokens=args.gpu_cache_tokens,
        disk=disk,
        host_bytes=int((args.host_gib or 0) * 2**30),
        disk_misses=args.disk_misses,
        kv_dtype=args.kv_dtype,
    )


def read_prompt(args) -> str:
    from kvdrive.engine.llm import check_text

    if args.file:
        try:
            with open(args.file, "rb") as f:
                return _utf8(f.read(), f"prompt file {args.file}")
        except OSError as err:
            raise KvdriveError(f"cannot read prompt file {args.file}: {err.strerror}") from None
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        return _utf8(sys.stdin.buffer.read(), "standard input")
    if args.prompt is None:
        raise KvdriveError("no prompt: give PROMPT, --file FILE, or pipe text into standard input")
    return check_text(args.prompt, "the PROMPT argument")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KvdriveError(
            f"{what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def run(args) -> int:
    from kvdrive import device as devices
    from kvdrive.engine.llm import LLM

    prompt = read_prompt(args)
    if not prompt.strip():
        raise KvdriveError("the prompt is empty: give some text")
    params = sampling_params(args)  # validate before the model loads
    devices.resolve(args.device)
    kv_cache = tiered_config(args)  # disk directories checked here, before the model loads
    # ``with``: the disk tier's extents go when the run ends, failed or interrupted
    with LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache=kv_cache,
        prefill_chunk=args.prefill_chunk,
    ) as llm:
        if not args.raw and llm.tokenizer is not None and getattr(llm.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt = llm.apply_chat_template(messages + [{"role": "user", "content": prompt}])
        if args.json:
            out = llm.generate([prompt], params)[0]
            print(
                json.dumps(
                    {
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "prompt_tokens": len(out.prompt_token_ids),
                        "finish_reason": out.finish_reason,
                    }
                )
            )
            return 0
        for piece in llm.stream(prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0
