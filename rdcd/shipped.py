"""The models that ship inside the package, by name (no torch import: drivers resolve names).

'default' is the distilled student every job uses unless told otherwise; 'pca' is the
zero-training model it was trained from (ImageNet Lite0 trunk + PCA heads, `train.pca_init`),
kept because training recipes start from it.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "assets" / "models"
SHIPPED_MODELS = {name: MODELS_DIR / name for name in ("default", "pca")}


def resolve_model_dir(spec: str) -> str:
    """A shipped model's name -> its directory; anything else is a directory path/URL."""
    shipped = SHIPPED_MODELS.get(spec)
    return str(shipped) if shipped is not None else spec


def is_shipped(spec: str) -> bool:
    return spec in SHIPPED_MODELS
