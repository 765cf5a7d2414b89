"""Input sets in the three layouts rdcd reads: a folder, WebDataset tars, Parquet with bytes.

Shared by test_sources.py and test_embed.py; every set is built from the same named images,
so a test can check that all layouts yield the same ids' bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from images import jpeg, webp


def photo_set(count: int, start_seed: int = 0) -> dict[str, bytes]:
    """count small distinct photos (JPEG, every fifth a WebP), keyed by 9-digit sample key."""
    images = {}
    for seed in range(start_seed, start_seed + count):
        key = f"{seed:09d}"
        images[key] = webp(seed, (72, 56)) if seed % 5 == 4 else jpeg(seed, (80, 60))
    return images


def extension_of(data: bytes) -> str:
    return "webp" if data[8:12] == b"WEBP" else "jpg"


def write_folder(directory: Path, images: dict[str, bytes]) -> dict[str, bytes]:
    """images as files in two sub-folders; returns image_id (relative path) -> bytes."""
    written = {}
    for i, (key, data) in enumerate(sorted(images.items())):
        relative = f"{'ab'[i % 2]}/{key}.{extension_of(data)}"
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[relative] = data
    return written


def write_tars(directory: Path, images: dict[str, bytes], per_tar: int) -> dict[str, bytes]:
    """img2dataset-style shards 00000.tar, ...: key.jpg|webp + key.json + key.txt per sample."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(images)
    for shard, start in enumerate(range(0, len(keys), per_tar)):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as archive:
            for key in keys[start : start + per_tar]:
                data = images[key]
                meta = json.dumps({"key": key, "status": "success"}).encode()
                for name, payload in (
                    (f"{key}.{extension_of(data)}", data),
                    (f"{key}.json", meta),
                    (f"{key}.txt", b"a caption"),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return dict(images)


def write_parquets(directory: Path, images: dict[str, bytes], per_file: int) -> dict[str, bytes]:
    """img2dataset-style Parquet: key, url, caption, jpg (bytes) columns."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(images)
    for shard, start in enumerate(range(0, len(keys), per_file)):
        chunk = keys[start : start + per_file]
        table = pa.table(
            {
                "key": chunk,
                "url": [f"https://example.com/{k}.jpg" for k in chunk],
                "caption": ["a caption"] * len(chunk),
                "jpg": pa.array([images[k] for k in chunk], pa.binary()),
            }
        )
        pq.write_table(table, directory / f"{shard:05d}.parquet", row_group_size=4)
    return dict(images)


def upload(s3_fs, local: Path, url: str) -> None:
    """Copy a local folder to s3://bucket/prefix."""
    s3_fs.put(str(local) + "/", url.removeprefix("s3://").rstrip("/") + "/", recursive=True)
    s3_fs.invalidate_cache()
