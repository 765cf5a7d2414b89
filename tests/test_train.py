"""The distillation job: a 2-worker DDP run on CPU (gloo) that checkpoints to S3 and resumes
with the same step and queue state, the teacher cache, the objectives' steps, the schedule
and the export (card, whitening, calibrated threshold)."""

from __future__ import annotations

import copy
import io
import math
import os

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from images import photo_like

from rdcd import cards, edits
from rdcd.augment import AugmentSettings
from rdcd.config import load_config
from rdcd.losses import RDCDCriterion, RDCDSettings, SSCDCriterion, SSCDSettings
from rdcd.models import DescriptorModel
from rdcd.sources import SourceOptions
from rdcd.storage import StorageOptions
from train.data import cached_dataset, image_key, read_exclude
from train.export import export_model, learn_whitening
from train.frozen import forward_both, freeze_prefix, prefix_features
from train.objectives import Inputs, RDCDObjective, SSCDObjective, StudentNet
from train.schedule import learning_rate, peak_learning_rate
from train.settings import SettingsError, StudentSettings, from_config, with_absolute_paths
from train.teacher_cache import CacheError, PrefixSpec, _prefix_identity, build_cache
from train.trainer import plan_steps, run_training

BUCKET_RUN = "s3://rdcd-test/train-run"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-images")
    for i in range(16):
        photo_like(100 + i, (64, 48)).save(folder / f"img{i:02d}.jpg", quality=92)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def tiny_config(input_url: str, output: str, **train_overrides) -> dict:
    overrides = [
        f"train.input={input_url}",
        f"train.output={output}",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.student.backbone=test_resnet",
        "train.student.pretrained=none",
        "train.student.dim=8",
        "train.student.dropout=0.0",
        "train.augment.size=32",
        "train.loss.teacher_queue=64",
        "train.loss.student_queue=64",
        "train.optim.batch_size=4",
        "train.optim.base_lr=4.0",
        "train.optim.warmup_epochs=0",
        "train.scaling.threads=1",
        "train.data.map_num_cpus=0.25",
        "train.data.shuffle_buffer=8",
        "train.export.input_size=32",
    ]
    overrides += [f"train.{key}={value}" for key, value in train_overrides.items()]
    return load_config(None, overrides)


def _checkpoint_states(s3_fs) -> dict[int, dict]:
    states = {}
    s3_fs.invalidate_cache()
    for path in s3_fs.glob("rdcd-test/train-run/ray/checkpoint_*/state.pt"):
        state = torch.load(io.BytesIO(s3_fs.cat(path)), map_location="cpu", weights_only=True)
        states[int(state["step"])] = state
    return states


def test_ddp_run_trains_checkpoints_to_s3_and_resumes(ray_session, s3_fs, image_folder):
    """2 gloo workers; a second run with a larger budget resumes at the last checkpoint."""
    config = tiny_config(
        str(image_folder),
        BUCKET_RUN,
        **{
            "optim.max_steps": 6,
            "optim.batch_size": 8,
            "scaling.num_workers": 2,
            "scaling.cpus_per_worker": 0.5,
        },
    )
    first = run_training(config)
    assert first["steps"].startswith("6 ")
    before = _checkpoint_states(s3_fs)
    assert sorted(before) == [3, 6]
    config["train"]["optim"]["max_steps"] = 9
    second = run_training(config)
    assert second["steps"].startswith("9 ")
    after = _checkpoint_states(s3_fs)
    assert sorted(after) == [6, 9], "two checkpoints kept"
    resumed, final = before[6], after[9]
    # Queues are global (gathered from both workers: 16 rows per step) and were restored:
    # the pointer moved on by 3 steps from the step-6 state, and the slots that the last
    # 3 steps did not overwrite still hold exactly what the first run had written there.
    for queue in ("teacher_queue", "student_queue"):
        pointer = int(resumed["criterion"][f"{queue}.pointer"])
        assert pointer == 6 * 16 % 64
        assert int(final["criterion"][f"{queue}.pointer"]) == (pointer + 3 * 16) % 64
        untouched = list(range((pointer + 48) % 64, pointer))
        assert len(untouched) == 16
        for field in ("features", "image_keys"):
            old = resumed["criterion"][f"{queue}.{field}"][untouched]
            new = final["criterion"][f"{queue}.{field}"][untouched]
            assert torch.equal(old, new)
        assert (resumed["criterion"][f"{queue}.image_keys"] >= 0).all(), "from real images"
    rows = _metrics(s3_fs)
    assert [row["step"] for row in rows] == list(range(1, 10))
    for row in rows:
        for key in (
            "loss",
            "loss_rel",
            "loss_con",
            "loss_hn",
            "lr",
            "sim_pos",
            "sim_neg",
            "sim_hard_neg",
        ):
            assert math.isfinite(row[key]), (key, row)
    # The first steps compare against the queues' random start vectors (an easy task, low
    # loss); from step 4 the queues (64 slots, 16 rows a step) hold only real entries, and from
    # there the loss must fall.
    full, last = (np.mean([row["loss"] for row in part]) for part in (rows[3:5], rows[-2:]))
    assert last < full, "the objective decreases once the queues are full"
    model, card = cards.load_model(f"{BUCKET_RUN}/model", StorageOptions.from_config(None))
    assert card.architecture.dim == 8 and card.training["steps"] == 9
    assert not any(name.startswith(("momentum", "criterion")) for name in model.state_dict())


def _metrics(s3_fs) -> list[dict]:
    s3_fs.invalidate_cache()
    with s3_fs.open("rdcd-test/train-run/metrics.csv", "rb") as handle:
        frame = duckdb.read_csv(io.BytesIO(handle.read())).df()
    return frame.sort_values("step").to_dict("records")


def test_teacher_cache_builds_once_and_feeds_pairs(ray_session, image_folder, tmp_path):
    exclude_file = tmp_path / "exclude.txt"
    exclude_file.write_text("# leave two out\nimg00.jpg\t0.99\tother.jpg\nimg01.jpg\n")
    exclude = read_exclude(str(exclude_file))
    assert exclude == {"img00.jpg", "img01.jpg"}
    kwargs = dict(
        input_url=str(image_folder),
        cache_url=str(tmp_path / "cache"),
        source_options=SourceOptions(),
        storage=StorageOptions(),
        augment=AugmentSettings(size=32),
        teacher="sscd",
        views=3,
        seed=0,
        exclude=exclude,
        max_pixels=10**8,
        device="cpu",
        actor_num_cpus=0.5,
        map_num_cpus=0.25,
    )
    manifest = build_cache(**kwargs)
    assert manifest["images"] == 14 and manifest["dim"] == 512
    table = duckdb.sql(
        f"SELECT image_id, image_key, len(views) AS k, len(teacher) AS kt "
        f"FROM read_parquet('{tmp_path}/cache/*.parquet') ORDER BY image_id"
    ).df()
    assert list(table["image_id"]) == [f"img{i:02d}.jpg" for i in range(2, 16)]
    assert (table["k"] == 3).all() and (table["kt"] == 3).all()
    assert table["image_key"].tolist() == [image_key(i) for i in table["image_id"]]
    teacher = pq.read_table(next((tmp_path / "cache").glob("*.parquet")))["teacher"]
    vectors = np.asarray(teacher.combine_chunks().flatten().flatten(), dtype=np.float32)
    assert np.allclose(np.linalg.norm(vectors.reshape(-1, 512), axis=1), 1.0, atol=1e-2)
    assert build_cache(**kwargs)["written_at"] == manifest["written_at"], "reused, not rebuilt"
    with pytest.raises(CacheError, match="other settings"):
        build_cache(**{**kwargs, "views": 4})
    pairs = cached_dataset(str(tmp_path / "cache"), StorageOptions(), 24, 0.25).take_all()
    assert len(pairs) == 14
    assert pairs[0]["view0"].shape == (24, 24, 3) and pairs[0]["teacher"].shape == (512,)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DescriptorModel("test_resnet", kd_dim=16, dim=8)


def _fixed_batch(n: int = 8, size: int = 32) -> dict[str, torch.Tensor]:
    views = [np.asarray(photo_like(i, (size, size))) for i in range(n)]
    shifted = [np.asarray(edits.jpeg(photo_like(i, (size, size)), 60)) for i in range(n)]
    teacher = torch.nn.functional.normalize(
        torch.randn(n, 16, generator=torch.Generator().manual_seed(0)), dim=1
    )
    return {
        "image_key": torch.arange(n),
        "view0": torch.from_numpy(np.stack(views)),
        "view1": torch.from_numpy(np.stack(shifted)),
        "teacher": teacher,
    }


@pytest.mark.parametrize("objective", ["rdcd", "sscd"])
def test_objective_losses_decrease_on_a_fixed_batch(tiny_model, objective):
    model = copy.deepcopy(tiny_model)
    inputs = Inputs((0.5,) * 3, (0.5,) * 3, 32, torch.device("cpu"))
    if objective == "rdcd":
        criterion = RDCDCriterion(
            RDCDSettings(kd_dim=16, dim=8, teacher_queue=32, student_queue=32)
        )
        step = RDCDObjective(StudentNet(model), model, criterion, inputs, momentum=0.99)
        term = "loss_rel"
    else:
        step = SSCDObjective(StudentNet(model), model, SSCDCriterion(SSCDSettings()), inputs)
        term = "loss_infonce"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = _fixed_batch()
    history = []
    for _ in range(12):
        loss, stats = step.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(stats[term])
    assert all(math.isfinite(v) for v in history)
    assert np.mean(history[-3:]) < np.mean(history[:3])
    if objective == "rdcd":
        assert set(step.modules()) == {"student", "momentum", "criterion"}
        moved = any(
            not torch.equal(a, b)
            for a, b in zip(model.parameters(), tiny_model.parameters(), strict=True)
        )
        lagging = any(
            not torch.equal(a, b)
            for a, b in zip(step.momentum_model.parameters(), model.parameters(), strict=True)
        )
        assert moved and lagging, "the momentum student follows the student, slowly"


def test_frozen_prefix_matches_the_full_network_and_gets_no_gradient():
    torch.manual_seed(0)
    model = DescriptorModel("test_efficientnet", kd_dim=16, dim=8).eval()
    x = torch.randn(3, 3, 32, 32)
    h, z = model.forward_both(x)
    for blocks in (1, 3, 5):
        freeze_prefix(model, blocks)
        features = prefix_features(model, x, blocks)
        via_features = forward_both(model, features, blocks, from_features=True)
        via_images = forward_both(model, x, blocks)
        for expected, got_f, got_i in zip((h, z), via_features, via_images, strict=True):
            assert torch.allclose(expected, got_f, atol=1e-5)
            assert torch.allclose(expected, got_i, atol=1e-5)
    model = DescriptorModel("test_efficientnet", kd_dim=16, dim=8).train()
    freeze_prefix(model, 3)
    _, z = forward_both(model, x, 3)
    z[:, 0].sum().backward()
    assert model.backbone.conv_stem.weight.grad is None
    assert all(p.grad is None for p in model.backbone.blocks[2].parameters())
    assert any(p.grad is not None for p in model.backbone.blocks[3].parameters())
    assert not model.backbone.bn1.training, "the prefix keeps its BatchNorm statistics"
    with pytest.raises(ValueError, match="EfficientNet-style"):
        freeze_prefix(DescriptorModel("test_resnet", kd_dim=16, dim=8), 2)
    with pytest.raises(ValueError, match="0..5"):
        freeze_prefix(model, 9)


def test_schedule_warms_up_then_decays_to_zero():
    peak = peak_learning_rate(1.0, 512)
    assert peak == 2.0
    assert learning_rate(0, 100, 10, peak) == 0.0
    assert learning_rate(5, 100, 10, peak) == pytest.approx(1.0)
    assert learning_rate(10, 100, 10, peak) == pytest.approx(2.0)
    assert learning_rate(55, 100, 10, peak) == pytest.approx(1.0)
    assert learning_rate(100, 100, 10, peak) == pytest.approx(0.0, abs=1e-12)


def test_step_plan_and_settings_checks(tmp_path):
    config = tiny_config(str(tmp_path), str(tmp_path / "out"), **{"optim.epochs": 3})
    settings = from_config(config)
    plan = plan_steps(settings, images=40)
    assert plan == {"total_steps": 30, "warmup_steps": 0, "steps_per_epoch": 10}
    with pytest.raises(SettingsError, match="no full global batch"):
        plan_steps(settings, images=3)
    with pytest.raises(SettingsError, match="max_steps"):
        plan_steps(settings, images=None)
    for key, value, message in [
        ("objective", "dino", "objective"),
        ("optim.amp", "fp8", "amp"),
        ("loss.use_rel", "false", None),
    ]:
        bad = tiny_config(str(tmp_path), str(tmp_path / "out"), **{key: value})
        if message is None:
            assert not from_config(bad).needs_teacher()
            continue
        with pytest.raises(SettingsError, match=message):
            from_config(bad)
    empty = tiny_config(
        str(tmp_path),
        str(tmp_path / "out"),
        **{"loss.use_rel": "false", "loss.use_con": "false", "loss.use_hn": "false"},
    )
    with pytest.raises(SettingsError, match="at least one"):
        from_config(empty)
    relative = with_absolute_paths(tiny_config("imgs", "s3://bucket/run"))
    assert relative["train"]["input"] == os.path.abspath("imgs"), "workers run elsewhere"
    assert relative["train"]["output"] == "s3://bucket/run"
    missing = load_config(None, [f"train.output={tmp_path}"])
    with pytest.raises(SettingsError, match="train.input"):
        from_config(missing)


def test_whitening_decorrelates_and_keeps_dim():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0
    mean, matrix = learn_whitening(data)
    white = (data - mean) @ matrix.T
    assert matrix.shape == (6, 6)
    assert np.allclose(np.cov(white, rowvar=False), np.eye(6), atol=1e-4)
    with pytest.raises(ValueError, match="more than"):
        learn_whitening(data[:5])


def test_export_whitens_and_calibrates(image_folder, tmp_path, tiny_model):
    """A synth-style calibration folder: references, edited queries, ground truth."""
    calibration = tmp_path / "calibration"
    (calibration / "references").mkdir(parents=True)
    (calibration / "queries").mkdir()
    lines = ["query_id,reference_id"]
    for i in range(6):
        original = photo_like(200 + i, (64, 48))
        original.save(calibration / "references" / f"R{i}.jpg")
        edits.jpeg(edits.crop(original, (0.05, 0.05, 0.95, 0.95)), 70).save(
            calibration / "queries" / f"Q{i}.jpg"
        )
        lines.append(f"Q{i},R{i}")
    photo_like(999, (64, 48)).save(calibration / "queries" / "Q9.jpg")
    lines.append("Q9,")
    (calibration / "ground_truth.csv").write_text("\n".join(lines) + "\n")
    config = tiny_config(
        str(image_folder),
        str(tmp_path / "run"),
        **{
            "student.kd_dim": 16,
            "export.background": str(image_folder),
            "export.calibration": str(calibration),
            "export.target_precision": 0.5,
        },
    )
    settings = from_config(config)
    state = {"student": tiny_model.state_dict(), "step": 3}
    card = export_model(settings, config, state, StorageOptions())
    model, loaded = cards.load_model(str(tmp_path / "run" / "model"))
    assert loaded.whitening.present and loaded.whitening.dim == 8
    assert loaded.model_id == card.model_id
    assert loaded.threshold is not None and -1.0 <= loaded.threshold <= 1.0
    assert loaded.training["whitening"]["images"] == 16
    assert loaded.training["calibration"]["n_positives"] == 6
    assert model.whitening is not None


def test_cli_reports_missing_settings_without_traceback(capsys, tmp_path):
    from pipelines.cli import main

    code = main(["train", "--set", f"train.output={tmp_path}"])
    assert code == 2
    assert "train.input is not set" in capsys.readouterr().err


def test_cached_prefix_is_keyed_by_the_init_models_content_not_its_name(tmp_path):
    """A shipped name such as 'default' can point to another model later: a teacher cache of
    prefix features must then be refused, and a copy of the same model under another path
    must still match."""
    torch.manual_seed(0)
    model = DescriptorModel("test_resnet", kd_dim=16, dim=8)
    cards.save_model(model, cards.card_for(model, 64), str(tmp_path / "a"))
    cards.save_model(model, cards.card_for(model, 64), str(tmp_path / "copy-of-a"))
    cards.save_model(
        DescriptorModel("test_resnet", kd_dim=16, dim=8),
        cards.card_for(model, 64),
        str(tmp_path / "b"),
    )

    def identity(init_from: str | None) -> dict:
        student = StudentSettings(backbone="test_resnet", frozen_blocks=2, init_from=init_from)
        return _prefix_identity(PrefixSpec(student, 64))

    a = identity(str(tmp_path / "a"))
    assert a["weights"] == cards.read_card(str(tmp_path / "a")).model_id
    assert identity(str(tmp_path / "copy-of-a")) == a
    assert identity(str(tmp_path / "b")) != a
    assert identity(None)["weights"] == "auto"
