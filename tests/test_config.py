"""The config loader: defaults, files, overrides, and errors that name the key."""

import pytest

from rdcd.config import ConfigError, load_config, parse_override


def test_defaults_load_and_overrides_apply(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  device: cpu\n")
    config = load_config(job, ["preprocess.max_pixels=1000", "ray.num_cpus=2"])
    assert config["model"]["device"] == "cpu"
    assert config["preprocess"]["max_pixels"] == 1000
    assert config["ray"]["num_cpus"] == 2
    assert config["model"]["card"] == "default"


def test_unknown_key_in_file_is_named(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  devise: cpu\n")
    with pytest.raises(ConfigError, match="model.devise"):
        load_config(job)


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match="nosuch.section"):
        load_config(None, ["nosuch.section=1"])


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("a=null") == {"a": None}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_section_cannot_be_replaced_by_scalar():
    with pytest.raises(ConfigError, match="section"):
        load_config(None, ["model=3"])
