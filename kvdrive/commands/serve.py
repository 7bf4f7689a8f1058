"""``kvdrive serve [MODEL]``: an OpenAI-compatible HTTP server (docs/serve.md)."""

from __future__ import annotations

import argparse
import os
import sys

from kvdrive.errors import KvdriveError


def add_parser(sub) -> None:
    from kvdrive.serve.settings import SETTINGS

    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve a model over HTTP: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, "
            "/health and /metrics (Prometheus). Every setting below can also come from a YAML file (--config, "
            "same names with underscores) or an environment variable (KVDRIVE_ and the name in capitals); a "
            "flag beats the environment, which beats the file. --print-config shows what is in force."
        ),
    )
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model to serve (same as --model)")
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (default: $KVDRIVE_CONFIG, if set)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    groups = {}
    for s in SETTINGS:
        g = groups.get(s.section) or groups.setdefault(s.section, p.add_argument_group(s.section))
        kwargs = {"dest": s.name, "default": argparse.SUPPRESS, "help": f"{s.help} [{s.env}]".replace("%", "%%")}
        if s.kind == "list":
            kwargs.update(action="append", metavar=s.name.upper())
        elif s.kind == "choice":
            kwargs.update(choices=s.choices)
        else:
            kwargs.update(type=_flag_type(s), metavar=s.name.upper())
        g.add_argument(s.flag, **kwargs)
    p.set_defaults(func=run)


def _flag_type(setting):
    from kvdrive.serve.settings import parse

    def convert(text: str):
        try:
            return parse(setting, text, setting.flag)
        except KvdriveError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{setting.flag}: ")) from None

    convert.__name__ = setting.kind
    return convert


def config_from_args(args):
    """The ``ServeConfig`` of a parsed command line: defaults < file < environment < flags."""
    from kvdrive import env
    from kvdrive.serve.config import read_file, resolve
    from kvdrive.serve.settings import BY_NAME, parse

    flags = {name: value for name, value in vars(args).items() if name in BY_NAME}
    if "api_key" in flags or "disk" in flags or "prefix_disk" in flags:
        for name in ("api_key", "disk", "prefix_disk"):
            if name in flags:
                flags[name] = parse(BY_NAME[name], flags[name], BY_NAME[name].flag)
    if args.model_arg is not None:
        if "model" in flags and flags["model"] != args.model_arg:
            raise KvdriveError(f"two models given: MODEL {args.model_arg!r} and --model {flags['model']!r}")
        flags["model"] = args.model_arg
    variables = env.kvdrive_variables()
    path = args.config or variables.get("KVDRIVE_CONFIG")
    file = read_file(path) if path else None
    return resolve(file, variables, flags, file_name=os.path.basename(path) if path else "config file")


def run(args) -> int:
    config = config_from_args(args)
    if args.print_config:
        sys.stdout.write(config.render())
        return 0
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise KvdriveError(
            f"kvdrive serve needs the serve extra ({err.name} is missing): pip install 'kvdrive[serve]'"
        ) from None
    from kvdrive.serve.server import serve

    serve(config)
    return 0
