"""Descriptors tables for index/match/dedup tests, without running a model.

`planted_vectors` makes unit vectors with known near-duplicate clusters; `write_descriptors`
writes any vectors as a real descriptors table (rdcd.tables schema) split over several files;
`pixel_descriptors` turns real image files into crude but genuine image descriptors (a small
colour thumbnail, centred and L2-normalised), so resize/JPEG copies of a photo land close
to it while different photos do not.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rdcd.tables import descriptor_array, descriptors_schema


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted_vectors(
    n: int, d: int, clusters: int, copies: int, noise: float, seed: int = 0
) -> tuple[np.ndarray, list[list[int]]]:
    """n unit vectors; `clusters` originals each get `copies` noisy copies (rows at the end).

    Returns the vectors (rounded to fp16, as stored) and the row lists of each cluster.
    """
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((n - clusters * copies, d)))
    originals = rng.choice(len(base), clusters, replace=False)
    planted, members = [], []
    for c, row in enumerate(originals):
        start = len(base) + c * copies
        planted.append(unit(base[row] + noise * rng.standard_normal((copies, d)) / np.sqrt(d)))
        members.append([int(row), *range(start, start + copies)])
    x = np.concatenate([base, *planted]) if planted else base
    return unit(x.astype(np.float16).astype(np.float32)), members


def write_descriptors(
    folder: str | Path,
    vectors: np.ndarray,
    ids: list[str] | None = None,
    files: int = 3,
    hashes: list[str] | None = None,
    sizes: list[tuple[int, int]] | None = None,
    uris: list[str] | None = None,
    model_id: str = "test-model",
) -> list[str]:
    """A descriptors table in folder (part-*.parquet); returns the image ids in row order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, d = vectors.shape
    ids = ids or [f"img{i:06d}" for i in range(n)]
    hashes = hashes or [hashlib.sha256(i.encode()).hexdigest() for i in ids]
    sizes = sizes or [(64, 48)] * n
    uris = uris or [f"/nowhere/{i}.jpg" for i in ids]
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        table = pa.table(
            {
                "image_id": ids[lo:hi],
                "uri": uris[lo:hi],
                "content_hash": hashes[lo:hi],
                "width": pa.array([s[0] for s in sizes[lo:hi]], pa.int32()),
                "height": pa.array([s[1] for s in sizes[lo:hi]], pa.int32()),
                "descriptor": descriptor_array(vectors[lo:hi]),
                "model_id": [model_id] * (hi - lo),
            },
            schema=descriptors_schema(d),
        )
        pq.write_table(table, folder / f"part-{f:05d}.parquet")
    return ids


def pixel_descriptor(data: bytes, side: int = 8) -> np.ndarray:
    """A side x side x 3 colour thumbnail of the image, centred and L2-normalised."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((side, side), Image.Resampling.BOX)
    x = np.asarray(img, dtype=np.float32).reshape(-1)
    x -= x.mean()
    return x / (np.linalg.norm(x) + 1e-6)


def pixel_descriptors(folder: str | Path, paths: list[Path]) -> list[str]:
    """A descriptors table for real image files (image_id = file name, uri = path)."""
    datas = [p.read_bytes() for p in paths]
    sizes = [Image.open(io.BytesIO(b)).size for b in datas]
    vectors = np.stack([pixel_descriptor(b) for b in datas])
    return write_descriptors(
        folder,
        vectors,
        ids=[p.name for p in paths],
        hashes=[hashlib.sha256(b).hexdigest() for b in datas],
        sizes=sizes,
        uris=[str(p) for p in paths],
        files=2,
    )


SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "ihc.png", "retina.jpg",
    "motorcycle_left.png", "brick.png", "grass.png", "camera.png", "coins.png", "page.png",
    "clock_motion.png", "cell.png", "color.png", "hubble_deep_field.jpg", "gravel.png",
    "moon.png", "text.png", "logo.png",
)  # fmt: skip
COPIED = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "motorcycle_left.jpg")


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def planted_photos(folder: str | Path) -> tuple[list[Path], dict[str, set[str]]]:
    """~40 JPEGs: the photos bundled with scikit-image, plus edited copies (resize, JPEG
    re-compression, crop, text overlay on a smaller copy, a byte-identical copy) of five of
    them. Returns the paths and {original name: names of its group}."""
    import skimage.data

    from rdcd import edits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(skimage.data.__file__).parent
    originals: dict[str, Image.Image] = {}
    for name in SKIMAGE_PHOTOS:
        img = Image.open(root / name).convert("RGB")
        img.thumbnail((256, 256))
        originals[Path(name).stem + ".jpg"] = img
    files = {name: _jpeg(img) for name, img in originals.items()}
    groups = {}
    for name in COPIED:
        img, stem = originals[name], Path(name).stem
        copies = {
            f"{stem}_resized.jpg": _jpeg(edits.resize(img, 0.6)),
            f"{stem}_recompressed.jpg": _jpeg(img, quality=30),
            f"{stem}_cropped.jpg": _jpeg(edits.crop(img, (0.04, 0.04, 0.96, 0.96))),
            f"{stem}_text.jpg": _jpeg(edits.overlay_text(edits.resize(img, 0.9), "copy", 0.12)),
        }
        if name == COPIED[0]:
            copies[f"{stem}_same_bytes.jpg"] = files[name]
        files.update(copies)
        groups[name] = {name, *copies}
    paths = []
    for name, data in sorted(files.items()):
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths, groups
