"""One YAML configuration tree: defaults from configs/local.yaml, a job file, --set overrides.

Every key a user may set exists in the defaults, so a typo is an error naming the key instead
of a silently ignored setting.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULTS_FILE = CONFIG_DIR / "local.yaml"


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], origin: str, prefix: str = "") -> None:
    """Merge update into base in place; keys must already exist in base."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base)) or "none"
            raise ConfigError(f"unknown config key '{dotted}' in {origin} (known here: {known})")
        if isinstance(base[key], dict) and base[key] and not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' in {origin} is a section, not a value")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            _merge(base[key], value, origin, dotted + ".")
        else:
            base[key] = value


def parse_override(text: str) -> dict[str, Any]:
    """Turn 'a.b.c=value' into {'a': {'b': {'c': value}}}, value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    dotted, raw = text.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {exc}") from exc
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults: str | Path = DEFAULTS_FILE,
) -> dict[str, Any]:
    """Resolve defaults <- config file <- overrides into one plain dict."""
    config = _read_yaml(defaults)
    if path is not None and Path(path).resolve() != Path(defaults).resolve():
        _merge(config, _read_yaml(path), str(path))
    for text in overrides:
        _merge(config, parse_override(text), f"--set {text}")
    return config


def section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A deep copy of one top-level section, so jobs cannot mutate the recorded config."""
    if name not in config:
        raise ConfigError(f"config has no section '{name}'")
    return copy.deepcopy(config[name])
