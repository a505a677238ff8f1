"""`coalesce serve [--config FILE]`, `coalesce check FILE`, `coalesce prepare FILE` and
`coalesce health`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from coalesce.telemetry import logs

from . import config as config_module
from .config import ConfigError


def _load(path: str | None) -> config_module.Config | None:
    try:
        return config_module.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path or '(default config)'}: {problem}", file=sys.stderr)
        return None


def _imports(config: config_module.Config) -> list[tuple[str, str]]:
    """(config key, "module:attr") of the Python objects the backends name."""
    found = []
    for name, backend in config.backends.items():
        kind = backend.type
        foreign = getattr(backend, "python", None) or getattr(backend, "requirements", None)
        if kind in ("local", "python") and not foreign:  # else it imports in its own venv
            found.append((f"backends.{name}.model", backend.model))  # type: ignore[union-attr]
        elif kind == "grpc" and backend.codec:  # type: ignore[union-attr]
            found.append((f"backends.{name}.codec", backend.codec))  # type: ignore[union-attr]
        elif ":" in kind:
            found.append((f"backends.{name}.type", kind))
    return found


def check(args: argparse.Namespace) -> int:
    """Validate the config and import (without calling) every model, codec and adapter
    it names, so that a typo shows here rather than when `serve` starts."""
    config = _load(args.config)
    if config is None:
        return 1
    from coalesce.core.adapter import import_string

    sys.path[:0] = [b.code for b in config.backends.values() if getattr(b, "code", None)]
    failed = False
    for key, path in _imports(config):
        try:
            import_string(path)
        except ImportError as exc:
            print(f"{args.config}: {key}: {exc}", file=sys.stderr)
            failed = True
    if failed:
        return 1
    print(f"{args.config}: ok ({len(config.backends)} backends, {len(config.routes)} routes)")
    return 0


def _reader(args: argparse.Namespace) -> Callable[[], config_module.Config]:
    """Reads the config file with the command line's overrides (again on every reload)."""
    overrides = {
        "listen": args.listen,
        "admin": args.admin,
        "http": args.http,
        "workers": args.workers,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.worker_index:  # only worker 0 serves the admin port
        overrides["admin"] = None

    def read() -> config_module.Config:
        config = config_module.load(args.config)
        if not overrides:
            return config
        return config_module.parse({**config.model_dump(), **overrides})

    return read


def serve(args: argparse.Namespace) -> int:
    read = _reader(args)
    try:
        config = read()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.config or '(default config)'}: {problem}", file=sys.stderr)
        return 1
    if config.workers > 1 and args.worker_index is None:
        from .workers import supervise

        return supervise(args.argv, config.workers)
    if args.worker_index is not None:
        from .workers import die_with_parent

        die_with_parent()
    from coalesce.core.router import StartupError

    from .server import Server

    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    from coalesce.ops import blas

    count = blas.limit()  # before any model runs: see coalesce.ops.blas
    if count is not None:
        logging.getLogger("coalesce").info("BLAS threads: %d (OPENBLAS_NUM_THREADS chooses)", count)
    try:
        runner(Server(config, source=read).run())
    except (StartupError, OSError) as exc:
        logging.getLogger("coalesce").error("cannot start: %s", exc)
        return 1
    return 0


def health(args: argparse.Namespace) -> int:
    from coalesce.ops.health_check import run

    return run(
        args.address,
        args.service,
        args.timeout,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        server_name=args.tls_server_name,
    )


def prepare(args: argparse.Namespace) -> int:
    """Build every python backend's environment (`requirements`) and exit: for an image
    build step or an init container, so that `serve` finds them in the cache."""
    config = _load(args.config)
    if config is None:
        return 1
    from coalesce.adapters.python_runtime import BuildFailed, Environment

    async def build(name: str, backend: config_module.PythonBackend) -> bool:
        environment = Environment(
            backend.requirements,  # type: ignore[arg-type]
            base=backend.python,
            cache_dir=backend.cache_dir,
            label=f"backend {name}",
            timeout_s=backend.build_timeout_s,
        )
        try:
            python = await environment.prepare()
        except BuildFailed as exc:
            print(f"{args.config}: backends.{name}: {exc}", file=sys.stderr)
            return False
        how = "in the cache" if environment.reused else f"built in {environment.seconds:.1f} s"
        print(f"backend {name}: {python} ({how})")
        return True

    async def build_all() -> list[bool]:
        wanted = {
            name: b
            for name, b in config.backends.items()
            if isinstance(b, config_module.PythonBackend) and b.requirements is not None
        }
        return list(await asyncio.gather(*(build(n, b) for n, b in wanted.items())))

    results = asyncio.run(build_all())
    if not results:
        print(f"{args.config}: no python backend has requirements: nothing to prepare")
    return 0 if all(results) else 1


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests check the Dockerfile and manifests against it)."""
    parser = argparse.ArgumentParser(prog="coalesce", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    common.add_argument(
        "--log-format", choices=logs.FORMATS, default="text", help="text or json (a line each)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", parents=[common], help="run the sidecar")
    serve_cmd.add_argument("--config", help="routing config (YAML); default: the bundled example")
    serve_cmd.add_argument("--listen", help="gRPC address host:port (overrides the config)")
    serve_cmd.add_argument("--admin", help="admin HTTP address host:port (overrides the config)")
    serve_cmd.add_argument(
        "--http", help="HTTP/JSON front ends' address host:port (overrides the config)"
    )
    serve_cmd.add_argument("--workers", type=int, help="serving processes (overrides the config)")
    serve_cmd.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve_cmd.set_defaults(run=serve)
    check_cmd = commands.add_parser(
        "check", parents=[common], help="validate a config and exit (1 on problems)"
    )
    check_cmd.add_argument("config")
    check_cmd.set_defaults(run=check)
    prepare_cmd = commands.add_parser(
        "prepare",
        parents=[common],
        help="build the python backends' environments (requirements) and exit (1 on failure)",
    )
    prepare_cmd.add_argument("config")
    prepare_cmd.set_defaults(run=prepare)
    health_cmd = commands.add_parser(
        "health", parents=[common], help="grpc.health.v1 check: exit 0 if SERVING, else 1"
    )
    health_cmd.add_argument(
        "--address",
        default=config_module.Config.model_fields["listen"].default,
        help="the server's gRPC address host:port (default: the config default, %(default)s)",
    )
    health_cmd.add_argument(
        "--service", default="", help="a routed model's name; default '': the whole server"
    )
    health_cmd.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)"
    )
    health_cmd.add_argument("--tls-ca", help="PEM CA bundle: check over TLS, trusting it")
    health_cmd.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    health_cmd.add_argument("--tls-key", help="PEM private key of --tls-cert")
    health_cmd.add_argument("--tls-server-name", help="the name to expect on the certificate")
    health_cmd.set_defaults(run=health)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments, handed on to workers
    logs.configure(args.log_level, args.log_format)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
