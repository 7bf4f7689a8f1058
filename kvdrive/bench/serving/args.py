"""``kvdrive bench serve``'s command line: the servers to run or attach to, the workloads, and
the optional phases (``--interference``, ``--repeat-doc``, ``--soak``, ``--single-stream``)."""

from __future__ import annotations


def add_arguments(p) -> None:
    s = p.add_argument_group("servers")
    s.add_argument("--url", help="a running kvdrive server (default: start `kvdrive serve MODEL` here)")
    s.add_argument(
        "--model",
        default="smollm2",
        help="the model of the kvdrive server started here, and of --generate-baseline (default smollm2)",
    )
    s.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for the kvdrive server started here, e.g. --serve-arg=--budget=2048 "
        "(repeatable; default: --max-model-len 2048 --prefix-host-gib 1)",
    )
    s.add_argument(
        "--transformers",
        metavar="MODEL",
        help="also start `transformers serve` on MODEL and run the same "
        "workloads against it: a Hugging Face directory, or an embedded model or .gguf that kvdrive has "
        "loaded once (its converted directory: the same fp32 weights kvdrive serves)",
    )
    s.add_argument("--transformers-url", help="a running transformers server to measure instead of starting one")
    s.add_argument(
        "--transformers-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for the transformers server started here (e.g. --transformers-arg=--device=cpu)",
    )
    s.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for a server (default 900)")
    w = p.add_argument_group("workloads")
    w.add_argument(
        "--workloads",
        nargs="*",
        default=["shared_prefix", "random"],
        choices=["shared_prefix", "random"],
        help="default: both; none (an empty list) for the extra measurements alone",
    )
    w.add_argument("--docs", type=int, default=4, help="shared_prefix: documents (default 4)")
    w.add_argument("--questions", type=int, default=4, help="shared_prefix: questions per document (default 4)")
    w.add_argument("--doc-tokens", type=int, default=1024, help="shared_prefix: tokens per document (default 1024)")
    w.add_argument("--random-prompts", type=int, default=16, help="random: requests (default 16)")
    w.add_argument("--prompt-tokens", type=int, default=256, help="random: tokens per prompt (default 256)")
    w.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    w.add_argument("--rate", type=float, default=1.0, help="requests per second, Poisson (default 1)")
    w.add_argument(
        "--token-prompts",
        action="store_true",
        help="send token ids instead of text (random-weight models have no tokenizer)",
    )
    w.add_argument("--seed", type=int, default=0)
    x = p.add_argument_group("extra measurements (kvdrive)")
    x.add_argument(
        "--interference",
        type=int,
        default=0,
        metavar="TOKENS",
        help="streams decode while a prompt of TOKENS tokens is prefilled: their inter-token latency "
        "before and during it (0: skip)",
    )
    x.add_argument("--streams", type=int, default=8, help="--interference: streams decoding (default 8)")
    x.add_argument(
        "--repeat-doc",
        type=int,
        default=0,
        metavar="TOKENS",
        help="--repeat-docs documents of TOKENS tokens, one at a time: each cold, then twice more with a "
        "new question (prefix pool on); TTFT p50 cold and repeated (0: skip)",
    )
    x.add_argument("--repeat-docs", type=int, default=4, help="--repeat-doc: documents (default 4)")
    x.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="a closed-loop load of --soak-clients clients, each sending its next random prompt when the "
        "last one ends, for SECONDS: errors, and server memory sampled every 2 s (0: skip)",
    )
    x.add_argument(
        "--soak-clients",
        type=int,
        default=32,
        help="--soak: clients (default 32; above the server's max_num_seqs keeps it saturated)",
    )
    x.add_argument("--soak-prompt-tokens", type=int, default=1024, help="--soak: tokens per prompt (default 1024)")
    x.add_argument(
        "--single-stream",
        type=int,
        default=0,
        metavar="TOKENS",
        help="one stream of TOKENS tokens: decode tokens/s through HTTP (0: skip)",
    )
    x.add_argument(
        "--generate-baseline",
        action="store_true",
        help="with --single-stream: the same decode with LLM.generate in this process, the model "
        "loaded with the kvdrive server's settings (--model, --serve-arg) once the servers stop",
    )
    p.add_argument("-o", "--out", default="bench/results/serve.json", help="JSON result path")
    p.add_argument("--plot", default=None, help="plot path (default: the JSON path with .png)")
