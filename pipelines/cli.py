"""The `rdcd` command line: the single place that knows every job."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipelines.jobs import add_common_arguments, run_job

# Each module defines COMMAND, HELP, add_arguments(parser) and run(args, config) -> summary.
JOB_MODULES: tuple[str, ...] = (
    "pipelines.embed",
    "pipelines.synth",
    "pipelines.eval",
    "pipelines.calibrate",
    "pipelines.quantize",
    "pipelines.dedup",
    "pipelines.index",
    "pipelines.search",
    "pipelines.report",
    "pipelines.nightly",
    "pipelines.backfill",
    "pipelines.train",
)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="rdcd",
        description="Image near-duplicate detection with compact distilled descriptors.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    jobs = {}
    for name in JOB_MODULES:
        job = importlib.import_module(name)
        sub = commands.add_parser(job.COMMAND, help=job.HELP, description=job.HELP)
        job.add_arguments(sub)
        add_common_arguments(sub)
        jobs[job.COMMAND] = job
    return parser, jobs


def main(argv: list[str] | None = None) -> int:
    parser, jobs = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run_job(jobs[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
