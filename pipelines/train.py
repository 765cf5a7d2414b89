"""`rdcd train --config configs/train/<recipe>.yaml`: RDCD distillation on Ray Train.

A thin job wrapper: everything happens in train.trainer.run_training (also reachable as
`python -m train`). Re-running the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipelines.jobs import JobError, module_main
from train.settings import SettingsError
from train.teacher_cache import CacheError
from train.trainer import run_training

COMMAND = "train"
HELP = "distil a compact student from a teacher (RDCD) or train the SSCD baseline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Set train.input and train.output in the recipe or with --set."


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_training(config, getattr(args, "address", None))
    except (SettingsError, CacheError) as exc:
        raise JobError(str(exc)) from exc


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
