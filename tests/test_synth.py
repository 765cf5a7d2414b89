"""`rdcd synth`: a labelled benchmark that is deterministic, complete and correctly counted."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from images import encode, photo_like
from PIL import Image

from pipelines.cli import main
from rdcd.synth import EDIT_KINDS, SynthSettings, plan_benchmark

N_GOOD = 20


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("originals")
    (folder / "sub").mkdir()
    for i in range(N_GOOD):
        size = (160 + 8 * i, 120 + 4 * (i % 5))
        target = folder / ("sub" if i % 4 == 0 else "") / f"img{i:02d}.jpg"
        target.write_bytes(encode(photo_like(100 + i, size), "JPEG", quality=90))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def synth(originals: Path, out: Path, *extra: str) -> int:
    return main(["synth", str(originals), str(out), *extra])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.fixture(scope="module")
def bench(originals, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "out"
    assert synth(originals, out, "--seed", "3") == 0
    return out


def test_counts_roles_and_ground_truth(bench):
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert [s["original"] for s in manifest["skipped"]] == ["broken.jpg"]
    roles = manifest["roles"]
    # 20 readable: 30% copied, 30% distractor refs, 30% distractor sources, rest fillers
    assert [len(roles[r]) for r in ("copied", "distractor_references", "distractor_sources")] == [
        6,
        6,
        6,
    ]
    assert len(roles["fillers"]) == 2
    assert len({name for names in roles.values() for name in names}) == N_GOOD
    references = sorted(p.stem for p in (bench / "references").glob("*.jpg"))
    queries = sorted(p.stem for p in (bench / "queries").glob("*.jpg"))
    assert len(references) == 12 and len(queries) == 24
    truth = read_csv(bench / "ground_truth.csv")
    assert sorted(row["query_id"] for row in truth) == queries
    matched = [row for row in truth if row["reference_id"]]
    assert len(matched) == 12
    assert all(row["reference_id"] in references for row in matched)
    copies = Counter(row["reference_id"] for row in matched)
    assert set(copies.values()) == {2} and len(copies) == 6
    by_query = {q["query_id"]: q for q in manifest["queries"]}
    for row in truth:
        query = by_query[row["query_id"]]
        assert (query["reference_id"] or "") == row["reference_id"]
        if row["reference_id"]:
            assert manifest["references"][row["reference_id"]] == query["original"]
            assert query["original"] in roles["copied"]
        else:
            assert query["original"] in roles["distractor_sources"]
        assert 1 <= len(query["edits"]) <= 3
        assert query["filler"] is None or query["filler"] in roles["fillers"]


def test_images_are_valid_and_sane(bench):
    for path in [*(bench / "references").glob("*.jpg"), *(bench / "queries").glob("*.jpg")]:
        with Image.open(path) as img:
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 8 <= min(img.size) and max(img.size) <= 1024


def test_dedup_variant_groups(bench):
    images = sorted(p.stem for p in (bench / "dedup" / "images").glob("*.jpg"))
    groups = {row["image_id"]: row["group_id"] for row in read_csv(bench / "dedup/groups.csv")}
    assert sorted(groups) == images and len(images) == 12 + 24
    sizes = Counter(Counter(groups.values()).values())
    assert sizes == {3: 6, 2: 6, 1: 6}  # ref + 2 copies; 2 distractor copies; lone refs
    truth = {r["query_id"]: r["reference_id"] for r in read_csv(bench / "ground_truth.csv")}
    for query, reference in truth.items():
        if reference:
            assert groups[query] == groups[reference]
    for name in images:
        assert (bench / "dedup/images" / f"{name}.jpg").read_bytes() == (
            bench / ("references" if name.startswith("R") else "queries") / f"{name}.jpg"
        ).read_bytes()


def test_same_seed_same_bytes_other_seed_other_benchmark(originals, bench, tmp_path):
    assert synth(originals, tmp_path / "again", "--seed", "3") == 0
    assert files(tmp_path / "again") == files(bench)
    assert synth(originals, tmp_path / "other", "--seed", "4") == 0
    assert read_csv(tmp_path / "other/ground_truth.csv") != read_csv(bench / "ground_truth.csv")


def test_rerun_is_skipped_and_changed_request_rebuilds(originals, tmp_path, capsys):
    out = tmp_path / "out"
    assert synth(originals, out, "--set", "synth.copies_per_reference=1") == 0
    written = json.loads((out / "manifest.json").read_text())["written_at"]
    capsys.readouterr()
    assert synth(originals, out, "--set", "synth.copies_per_reference=1") == 0
    assert "already complete" in capsys.readouterr().out
    assert synth(originals, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["copy_queries"] == 12
    assert written <= manifest["written_at"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.jpg").write_bytes(encode(photo_like(1), "JPEG"))
    assert synth(tmp_path / "one", tmp_path / "out") == 2
    assert "at least 2" in capsys.readouterr().err
    assert synth(tmp_path / "missing", tmp_path / "out") == 2
    bad = ["--set", "synth.max_edits=0"]
    assert main(["synth", str(tmp_path / "one"), str(tmp_path / "o"), *bad]) == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("mine")
    (tmp_path / "one" / "b.jpg").write_bytes(encode(photo_like(2), "JPEG"))
    assert synth(tmp_path / "one", tmp_path / "keep") == 2
    assert "not a `rdcd synth` output" in capsys.readouterr().err
    assert (tmp_path / "keep" / "precious.txt").read_text() == "mine"
    assert synth(tmp_path / "one", tmp_path / "one" / "bench") == 2
    assert "must not be inside" in capsys.readouterr().err


def test_edit_proportions_follow_the_weights():
    weights = {name: 0.0 for name in EDIT_KINDS}
    weights.update({"crop": 3.0, "jpeg": 1.0, "text": 2.0, "paste_onto": 2.0})
    settings = SynthSettings(min_edits=1, max_edits=1, edit_weights=weights)
    plan = plan_benchmark(1000, settings, seed=0)
    drawn = Counter(q.chain[0]["edit"] for q in plan.queries)
    assert set(drawn) == {"crop", "jpeg", "text", "paste_onto"}
    total = sum(drawn.values())
    for name in drawn:
        assert drawn[name] / total == pytest.approx(weights[name] / 8.0, abs=0.05)
    # a compositing edit gets a filler; never two compositing edits in one chain
    settings = SynthSettings(max_edits=3, edit_weights={"paste_onto": 50.0, "overlay_image": 50.0})
    for query in plan_benchmark(200, settings, seed=1).queries:
        needing = [s for s in query.chain if EDIT_KINDS[s["edit"]].needs_filler]
        assert len(needing) <= 1 and (query.filler is not None) == bool(needing)


def test_config_weights_match_the_documented_defaults():
    from rdcd.config import load_config

    section = load_config()["synth"]
    configured = SynthSettings.from_config(section)
    assert configured.weights() == SynthSettings().weights()
    assert replace(configured, edit_weights=None) == SynthSettings()
    assert set(section["edit_weights"]) == set(EDIT_KINDS)


def test_synth_writes_to_object_storage(originals, s3_server, s3_fs):
    out = f"s3://{s3_server.bucket}/synth-out"
    assert main(["synth", str(originals), out, "--set", "synth.copies_per_reference=1"]) == 0
    listing = s3_fs.find(f"{s3_server.bucket}/synth-out")
    names = {p.rsplit("/", 1)[-1] for p in listing}
    assert {"manifest.json", "ground_truth.csv", "groups.csv"} <= names
    assert sum(p.endswith(".jpg") for p in listing) == 2 * (12 + 6 + 6 * 2)
    data = s3_fs.cat(f"{s3_server.bucket}/synth-out/queries/Q00000.jpg")
    assert np.asarray(Image.open(io.BytesIO(data))).shape[2] == 3
