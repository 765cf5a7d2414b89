"""`rdcd eval` and `rdcd calibrate` on real Parquet/CSV files, as a user runs them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from rdcd import cards, tables
from rdcd.models import DescriptorModel


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_predictions(folder: Path, rows: list[tuple[str, str, float]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(zip(*rows, strict=True))
    table = pa.Table.from_arrays(
        [pa.array(columns[0]), pa.array(columns[1]), pa.array(columns[2], pa.float32())],
        schema=tables.PREDICTIONS_SCHEMA,
    )
    pq.write_table(table, folder / "part-0.parquet")
    return folder


def write_pairs(folder: Path, rows: list[tuple[str, str, float]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    a, b, s = (list(c) for c in zip(*rows, strict=True))
    table = pa.table(
        {
            "image_id_a": a,
            "image_id_b": b,
            "score": pa.array(s, pa.float32()),
            "exact": [False] * len(a),
            "run_id": ["r"] * len(a),
            "model_id": ["m"] * len(a),
        },
        schema=tables.PAIRS_SCHEMA,
    )
    pq.write_table(table, folder / "part-0.parquet")
    return folder


# Predictions as `rdcd search` writes them: folder ids keep their extension.
PREDICTIONS = [
    ("Q1.jpg", "R1.jpg", 0.9),  # true
    ("Q2.jpg", "R7.jpg", 0.8),  # wrong reference
    ("Q2.jpg", "R2.jpg", 0.75),  # true, rank 1 for Q2
    ("Q4.jpg", "R5.jpg", 0.5),  # distractor query
]
TRUTH = [("Q1", "R1"), ("Q2", "R2"), ("Q3", "R3"), ("Q4", "")]


def test_eval_copy_detection_prints_and_writes_json(tmp_path, capsys):
    predictions = write_predictions(tmp_path / "predictions", PREDICTIONS)
    truth = write_csv(tmp_path / "ground_truth.csv", ["query_id", "reference_id"], TRUTH)
    out = tmp_path / "metrics" / "eval.json"
    assert main(["eval", str(predictions), str(truth), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "µAP" in printed and "0.5556" in printed
    result = json.loads(out.read_text())
    assert result["kind"] == "copy_detection"
    assert result["uap"] == pytest.approx((1 + 2 / 3) / 3, abs=1e-6)
    assert result["acc_at_1"] == pytest.approx(1 / 3)
    assert result["recall_at_p90"] == pytest.approx(1 / 3)
    assert result["n_queries"] == 4 and result["n_predicted_queries"] == 3


def test_eval_reads_isc_style_csv_and_a_synth_folder(tmp_path):
    rows = [(q.removesuffix(".jpg"), r, s) for q, r, s in PREDICTIONS]
    predictions = write_csv(tmp_path / "pred.csv", ["query_id", "reference_id", "score"], rows)
    bench = tmp_path / "bench"
    bench.mkdir()
    write_csv(bench / "ground_truth.csv", ["query_id", "reference_id"], TRUTH)
    out = tmp_path / "eval.json"
    assert main(["eval", str(predictions), str(bench), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["uap"] == pytest.approx(5 / 9, abs=1e-6)


def test_eval_errors_are_one_clear_line(tmp_path, capsys):
    truth = write_csv(tmp_path / "ground_truth.csv", ["query_id", "reference_id"], TRUTH)
    twice = write_predictions(tmp_path / "twice", [PREDICTIONS[0], PREDICTIONS[0]])
    assert main(["eval", str(twice), str(truth)]) == 2
    assert "duplicate" in capsys.readouterr().err
    odd = write_csv(tmp_path / "odd.csv", ["a", "b"], [("x", "y")])
    assert main(["eval", str(odd), str(truth)]) == 2
    assert "expected query_id" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), str(truth)]) == 2


GROUPS = [("a", "g1"), ("b", "g1"), ("c", "g1"), ("d", "g2"), ("e", "g3")]


def test_eval_dedup_pairs_and_output_folder(tmp_path):
    truth = write_csv(tmp_path / "groups.csv", ["image_id", "group_id"], GROUPS)
    run = tmp_path / "dedup-run"
    write_pairs(run / "pairs", [("a.jpg", "b.jpg", 0.95), ("c.jpg", "d.jpg", 0.6)])
    out = tmp_path / "dedup.json"
    assert main(["eval", str(run / "pairs"), str(truth), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "dedup"
    assert result["pair_precision"] == pytest.approx(0.5)
    assert result["pair_recall"] == pytest.approx(1 / 3)
    assert result["bcubed_precision"] == pytest.approx(4 / 5)
    # a higher threshold drops the wrong pair
    assert main(["eval", str(run), str(truth), "--threshold", "0.9", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["pair_precision"] == 1.0
    # the groups written by the run are used when present
    groups = pa.table({"image_id": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "group_id": ["x"] * 4})
    (run / "groups").mkdir()
    pq.write_table(groups, run / "groups" / "part-0.parquet")
    assert main(["eval", str(run), str(truth), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_predicted_groups"] == 2  # {a,b,c,d} and the singleton e
    assert result["bcubed_recall"] == 1.0


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    model = DescriptorModel("test_resnet", kd_dim=16, dim=8)
    folder = tmp_path / "model"
    cards.save_model(model, cards.card_for(model, size=64), str(folder))
    return folder


CALIBRATION = [
    ("Q1", "R1", 0.95),
    ("Q2", "R2", 0.90),
    ("Q3", "R9", 0.90),
    ("Q3", "R3", 0.80),
    ("Q4", "R4", 0.70),
    ("Q5", "R1", 0.60),
]
CALIBRATION_TRUTH = [("Q1", "R1"), ("Q2", "R2"), ("Q3", "R3"), ("Q4", "R4"), ("Q5", "")]


def test_calibrate_writes_the_threshold_into_the_card(tmp_path, model_dir):
    predictions = write_predictions(tmp_path / "pred", CALIBRATION)
    truth = write_csv(tmp_path / "gt.csv", ["query_id", "reference_id"], CALIBRATION_TRUTH)
    before = cards.read_card(str(model_dir))
    base = ["calibrate", str(predictions), str(truth), "--model", str(model_dir)]
    assert main([*base, "--target-precision", "0.75", "--dry-run"]) == 0
    assert cards.read_card(str(model_dir)).threshold is None
    assert main([*base, "--target-precision", "0.75"]) == 0
    after = cards.read_card(str(model_dir))
    assert after.threshold == pytest.approx(0.7)  # 4 of 5 accepted are true
    assert after.model_id == before.model_id
    assert main(base) == 0  # default target 0.99: only the top score qualifies
    assert cards.read_card(str(model_dir)).threshold == pytest.approx(0.95)
    copy = tmp_path / "calibrated"
    assert main([*base, "--target-precision", "0.75", "--out", str(copy)]) == 0
    assert cards.read_card(str(copy)).threshold == pytest.approx(0.7)
    model, card = cards.load_model(str(copy))  # weights travelled with the card
    assert card.model_id == before.model_id


def test_calibrate_refuses_what_it_cannot_do(tmp_path, model_dir, capsys):
    predictions = write_predictions(tmp_path / "pred", [("Q5", "R1", 0.9), ("Q1", "R1", 0.5)])
    truth = write_csv(tmp_path / "gt.csv", ["query_id", "reference_id"], CALIBRATION_TRUTH)
    base = ["calibrate", str(predictions), str(truth), "--model", str(model_dir)]
    assert main([*base, "--target-precision", "0.9"]) == 2
    assert "no threshold reaches" in capsys.readouterr().err
    assert cards.read_card(str(model_dir)).threshold is None
    (tmp_path / "pred" / "manifest.json").write_text(json.dumps({"model_id": "rdcd-other-1"}))
    assert main([*base, "--target-precision", "0.5"]) == 2
    assert "made by model rdcd-other-1" in capsys.readouterr().err
    normalised = {"model_id": cards.read_card(str(model_dir)).model_id, "score_normalisation": True}
    (tmp_path / "pred" / "manifest.json").write_text(json.dumps(normalised))
    assert main([*base, "--target-precision", "0.5"]) == 2
    assert "score-normalised" in capsys.readouterr().err
    assert cards.read_card(str(model_dir)).threshold is None


MILD_EDITS = ("jpeg", "resize", "blur")


def test_synth_search_eval_end_to_end(tmp_path, ray_session):
    """Benchmark ids survive embedding and search: `rdcd eval` scores the real predictions."""
    from descriptors import pixel_descriptors
    from images import encode, photo_like

    from pipelines import dedup, search
    from pipelines.jobs import module_main
    from rdcd.synth import EDIT_KINDS

    originals = tmp_path / "originals"
    originals.mkdir()
    for i in range(24):
        (originals / f"p{i:02d}.jpg").write_bytes(encode(photo_like(500 + i), "JPEG"))
    mild = [f"synth.edit_weights.{k}=0" for k in EDIT_KINDS if k not in MILD_EDITS]
    bench = tmp_path / "bench"
    assert main(["synth", str(originals), str(bench), *sum((["--set", o] for o in mild), [])]) == 0
    for part in ("queries", "references", "dedup/images"):
        pixel_descriptors(tmp_path / "desc" / part, sorted((bench / part).glob("*.jpg")))
    desc = tmp_path / "desc"
    run = tmp_path / "run"
    argv = [str(desc / "queries"), str(desc / "references"), str(run), "--k", "5"]
    assert module_main(search, argv) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), str(bench), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    n_queries = len(list((bench / "queries").glob("*.jpg")))
    assert result["n_queries"] == result["n_predicted_queries"] == n_queries
    assert result["n_predictions"] == n_queries * 5
    assert result["n_ground_truth"] == n_queries // 2
    assert result["acc_at_1"] == 1.0  # mild edits: every copy finds its reference first
    assert result["uap"] > 0.9
    argv = [str(desc / "dedup/images"), str(tmp_path / "dedup"), "--threshold", "0.95"]
    assert module_main(dedup, argv) == 0
    assert main(["eval", str(tmp_path / "dedup"), str(bench), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "dedup" and result["n_images"] == n_queries + 14
    assert result["pair_precision"] > 0.9 and result["pair_recall"] > 0.5
