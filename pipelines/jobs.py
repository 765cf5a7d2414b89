"""What every job shares: the common options, config resolution, errors and the end summary."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from rdcd.config import ConfigError, load_config
from rdcd.runtime import apply_local_defaults


class JobError(RuntimeError):
    """A failure the user can act on; printed as one line without a traceback."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults: configs/local.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set embed.batch_size=64 (repeatable)",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config, args.overrides)
    if getattr(args, "address", None):
        config["ray"]["address"] = args.address
    return config


def format_summary(title: str, rows: dict[str, Any]) -> str:
    """A short aligned block: what ran, what came out, where it is."""
    width = max((len(key) for key in rows), default=0)
    lines = [f"== {title} =="]
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:,.2f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        lines.append(f"  {key.ljust(width)}  {value}")
    return "\n".join(lines)


def run_job(job: ModuleType, args: argparse.Namespace) -> int:
    """Run one job module's run(args, config); print its summary or a one-line error."""
    apply_local_defaults()
    started = time.perf_counter()
    try:
        config = resolve_config(args)
        summary = job.run(args, config)
    except (JobError, ConfigError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"rdcd {job.COMMAND}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"rdcd {job.COMMAND}: interrupted; re-run the same command to resume", file=sys.stderr
        )
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"rdcd {job.COMMAND}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    if summary:
        rows = dict(summary)
        rows.setdefault("wall time (s)", round(time.perf_counter() - started, 1))
        print(format_summary(f"rdcd {job.COMMAND}", rows))
    return 0


def module_main(job: ModuleType, argv: list[str] | None = None) -> int:
    """`python -m pipelines.<job>`: the same parser and behaviour as `rdcd <job>`."""
    parser = argparse.ArgumentParser(prog=f"python -m {job.__name__}", description=job.HELP)
    job.add_arguments(parser)
    add_common_arguments(parser)
    return run_job(job, parser.parse_args(argv))


def entrypoint(job: ModuleType) -> Callable[[], None]:
    return lambda: sys.exit(module_main(job))
