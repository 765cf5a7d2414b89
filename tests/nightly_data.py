"""Photos arriving night by night, with planted copies, and the small models that embed them.

Shared by the nightly, backfill, Ray job and multi-node tests (``from nightly_data import
...``). The model is the packaged ImageNet Lite0 trunk at 64 px with random heads, PCA-whitened
on photos that never appear in the nights: small and fast, yet it puts crop/resize/JPEG copies
of a photo well above unrelated photos. Cards are built once per test session and reused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml
from images import encode, photo_like

from rdcd import edits
from rdcd.config import load_config

NIGHTS = ("2026-11-01", "2026-11-02", "2026-11-03")
SIZE = (96, 72)
THRESHOLD = 0.6
PLANTED = {
    ("p003.jpg", "p003_copy.jpg"),  # byte-identical copy, same night
    ("c001_crop.jpg", "p001.jpg"),  # night 2 copy of a night 1 photo
    ("c001_resize.jpg", "p001.jpg"),  # night 3: joins that group
    ("c001_crop.jpg", "c001_resize.jpg"),
    ("c009_jpeg.jpg", "p009.jpg"),  # copy and original on the same night
    ("c010_crop.jpg", "p010.jpg"),  # night 3 copy of a night 2 photo
}
EXACT = {("p003.jpg", "p003_copy.jpg")}


def model_card(base: Path, name: str, seed: int) -> str:
    """A whitened Lite0 card (d=48, threshold 0.6) under base/name, built once and reused."""
    folder = base / name
    card = folder / "model"
    if (card / "card.json").exists():
        return str(card)
    import torch

    from rdcd import cards
    from rdcd.embedder import load_embedder
    from rdcd.models import DescriptorModel
    from rdcd.preprocess import load_rgb
    from train.export import learn_whitening

    torch.manual_seed(seed)
    model = DescriptorModel("tf_efficientnet_lite0", kd_dim=256, dim=64, pretrained="package")
    model.eval()
    raw = folder / "raw"
    cards.save_model(model, cards.card_for(model, size=64), str(raw))
    embedder = load_embedder(str(raw), device="cpu", runtime="torch")
    background = np.stack(
        [
            load_rgb(encode(photo_like(1000 + s, SIZE), "JPEG", quality=90), size=64)[0]
            for s in range(160)
        ]
    )
    mean, matrix = learn_whitening(embedder.embed(background))
    model.set_whitening(torch.tensor(mean), torch.tensor(matrix[:48]))
    staging = folder / "staging"
    cards.save_model(model, cards.card_for(model, size=64, threshold=THRESHOLD), str(staging))
    staging.rename(card)
    shutil.rmtree(raw)
    return str(card)


def _jpeg(img, quality: int = 90) -> bytes:
    return encode(img, "JPEG", quality=quality)


def night_images() -> dict[str, dict[str, bytes]]:
    """date -> file name -> bytes. Night 3 re-delivers p008 unchanged (already known) and
    p011 with other content (an id conflict); night 2 holds one undecodable file."""
    photo = {s: photo_like(s, SIZE) for s in range(16)}
    first = {f"p{s:03d}.jpg": _jpeg(photo[s]) for s in range(8)}
    first["p003_copy.jpg"] = first["p003.jpg"]
    second = {f"p{s:03d}.jpg": _jpeg(photo[s]) for s in range(8, 12)}
    second["c001_crop.jpg"] = _jpeg(edits.crop(photo[1], (0.04, 0.04, 0.96, 0.96)))
    second["c009_jpeg.jpg"] = _jpeg(photo[9], quality=60)
    second["broken.jpg"] = second["p008.jpg"][:300]
    third = {f"p{s:03d}.jpg": _jpeg(photo[s]) for s in range(12, 16)}
    third["c001_resize.jpg"] = _jpeg(edits.resize(photo[1], 0.8))
    third["c010_crop.jpg"] = _jpeg(edits.crop(photo[10], (0.03, 0.03, 0.97, 0.97)))
    third["p008.jpg"] = second["p008.jpg"]
    third["p011.jpg"] = _jpeg(photo_like(111, SIZE))
    return dict(zip(NIGHTS, (first, second, third), strict=True))


def write_nights(root: Path) -> dict[str, Path]:
    """incoming/<date>/ per night, and all/: every image the history ends up holding (what one
    batch run over everything sees). Returns {"incoming": ..., "all": ...}."""
    nights = night_images()
    for date, images in nights.items():
        for name, data in images.items():
            path = root / "incoming" / date / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    everything: dict[str, bytes] = {}
    for images in nights.values():
        for name, data in images.items():
            everything.setdefault(name, data)
    for name, data in everything.items():
        path = root / "all" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {"incoming": root / "incoming", "all": root / "all"}


def overrides(card: str, history: str, incoming: str) -> dict:
    """The config a test run uses (nested, as a YAML file would hold it)."""
    return {
        "model": {"card": card, "runtime": "torch", "device": "cpu"},
        "nightly": {
            "history": history,
            "input": f"{incoming}/{{date}}",
            "group_buckets": 4,
            "task_cpus": 0.5,
        },
        "input": {"files_per_shard": 4},
        "embed": {"write_batch_size": 8, "batch_size": 16},
        "index": {"task_cpus": 0.5},
        "match": {"task_cpus": 0.5},
    }


def config_for(card: str, history: str, incoming: str) -> dict:
    config = load_config()
    for section, values in overrides(card, history, incoming).items():
        config[section].update(values)
    return config


def write_config(path: Path, card: str, history: str, incoming: str, **extra) -> Path:
    """The same config as a YAML file, for jobs run as `python -m` or through `ray job`."""
    tree = overrides(card, history, incoming)
    for section, values in extra.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path
