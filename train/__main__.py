"""`python -m train --config configs/train/<recipe>.yaml [--set key=value ...]`.

The same job as `rdcd train`, without the pipelines package (train/ never imports it).
"""

from __future__ import annotations

import argparse
import sys

from rdcd.config import ConfigError, load_config
from rdcd.runtime import apply_local_defaults
from train.settings import SettingsError
from train.trainer import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", help="YAML recipe (defaults: configs/local.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable)",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    args = parser.parse_args(argv)
    apply_local_defaults()
    try:
        config = load_config(args.config, args.overrides)
        summary = run_training(config, args.address)
    except (ConfigError, SettingsError, FileNotFoundError) as exc:
        print(f"python -m train: error: {exc}", file=sys.stderr)
        return 2
    width = max(len(key) for key in summary)
    print("== rdcd train ==")
    for key, value in summary.items():
        print(f"  {key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
