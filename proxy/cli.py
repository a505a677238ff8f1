"""`coalesce serve [--config FILE]` and `coalesce check FILE`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import config as config_module
from .config import ConfigError


def _load(path: str | None) -> config_module.Config | None:
    try:
        return config_module.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path or '(default config)'}: {problem}", file=sys.stderr)
        return None


def check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    print(f"{args.config}: ok ({len(config.backends)} backends, {len(config.routes)} routes)")
    return 0


def serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    overrides = {"listen": args.listen, "admin": args.admin}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if overrides:
        try:
            config = config_module.parse({**config.model_dump(), **overrides})
        except ConfigError as exc:
            print("\n".join(f"--{p}" for p in exc.problems), file=sys.stderr)
            return 1
    from .router import StartupError
    from .server import Server

    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(Server(config).run())
    except (StartupError, OSError) as exc:
        logging.getLogger("coalesce").error("cannot start: %s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coalesce", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", parents=[common], help="run the sidecar")
    serve_cmd.add_argument("--config", help="routing config (YAML); default: the bundled example")
    serve_cmd.add_argument("--listen", help="gRPC address host:port (overrides the config)")
    serve_cmd.add_argument("--admin", help="admin HTTP address host:port (overrides the config)")
    serve_cmd.set_defaults(run=serve)
    check_cmd = commands.add_parser(
        "check", parents=[common], help="validate a config and exit (1 on problems)"
    )
    check_cmd.add_argument("config")
    check_cmd.set_defaults(run=check)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
