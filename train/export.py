"""From the final checkpoint to a deployable model card: student trunk, kd head and projector
only (no momentum student, no queues), optionally PCA-whitened on a background set and given
a recommended threshold from a labelled calibration set (an `rdcd synth` folder).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from rdcd import cards, metrics, sources
from rdcd.embedder import load_embedder
from rdcd.models import DescriptorModel, model_mean_std
from rdcd.preprocess import ImageError, load_rgb
from rdcd.storage import StorageOptions, get_filesystem, join, strip_protocol
from train.settings import TrainSettings

EMBED_BATCH = 32


def student_from_state(settings: TrainSettings, state: dict[str, Any]) -> DescriptorModel:
    """The online student of a checkpoint, in eval mode on the CPU."""
    s = settings.student
    model = DescriptorModel(s.backbone, kd_dim=s.kd_dim, dim=s.dim, gem_p=s.gem_p)
    model.load_state_dict(state["student"])
    return model.eval()


def embed_images(
    url: str,
    model_dir: str,
    storage: StorageOptions,
    source_options: sources.SourceOptions,
    limit: int | None = None,
) -> tuple[list[str], np.ndarray]:
    """(image ids, unit descriptors) of the images at url with the exported model.

    Runs in this process: background and calibration sets are small by design (a whitening
    needs ~1000·d vectors); use `rdcd embed` for corpora.
    """
    embedder = load_embedder(model_dir, device="auto", storage=storage)
    listing = sources.list_inputs(url, source_options, storage)
    ids: list[str] = []
    pixels: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    for shard in listing.shards:
        for table in sources.read_shard(shard, source_options, storage):
            for image_id, data in zip(
                table.column("image_id").to_pylist(), table.column("bytes").to_pylist(), strict=True
            ):
                if data is None or (limit is not None and len(ids) >= limit):
                    continue
                try:
                    rgb, _ = load_rgb(data, size=embedder.input_size, policy=embedder.resize)
                except ImageError:
                    continue
                ids.append(image_id)
                pixels.append(rgb)
                if len(pixels) == EMBED_BATCH:
                    outputs.append(embedder.embed(np.stack(pixels)))
                    pixels = []
    if pixels:
        outputs.append(embedder.embed(np.stack(pixels)))
    if not ids:
        raise ValueError(f"no readable image in {url}")
    return ids, np.concatenate(outputs)


def learn_whitening(descriptors: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening (mean, matrix) with eigenvalue power −1/2 and the output dim = input dim,
    as FAISS PCAMatrix(d, d, −0.5) in SSCD's PCAW codec (METHOD.md §4.2)."""
    n, dim = descriptors.shape
    if n <= dim:
        raise ValueError(f"whitening {dim}-d descriptors needs more than {dim} images, got {n}")
    data = descriptors.astype(np.float64)
    mean = data.mean(axis=0)
    covariance = np.cov(data - mean, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    matrix = (eigenvectors / np.sqrt(np.maximum(eigenvalues, eps))).T
    if not np.all(np.isfinite(matrix)):
        raise ValueError("whitening produced non-finite values")
    return mean.astype(np.float32), matrix.astype(np.float32)


def calibration_scores(
    folder: str,
    model_dir: str,
    storage: StorageOptions,
    source_options: sources.SourceOptions,
    k: int = 10,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and labels of the top-k references of each query of an `rdcd synth` folder."""
    truth_url = join(folder, "ground_truth.csv")
    with get_filesystem(truth_url, storage).open(strip_protocol(truth_url), "rb") as handle:
        truth = pd.read_csv(handle, dtype=str, keep_default_na=False)
    query_ids, queries = embed_images(join(folder, "queries"), model_dir, storage, source_options)
    ref_ids, refs = embed_images(join(folder, "references"), model_dir, storage, source_options)
    similarities = queries @ refs.T
    top = np.argsort(-similarities, axis=1)[:, :k]
    rows = np.repeat(np.arange(len(query_ids)), top.shape[1])
    columns = top.reshape(-1)
    gt = metrics.ground_truth_pairs(truth["query_id"], truth["reference_id"])
    return metrics.labelled_predictions(
        [query_ids[i] for i in rows],
        [ref_ids[j] for j in columns],
        similarities[rows, columns],
        gt,
    )


def training_record(settings: TrainSettings, steps: int) -> dict[str, Any]:
    """How the model was trained, as the card keeps it (paths as the user gave them)."""
    return {
        "objective": settings.objective,
        "teacher": settings.teacher if settings.needs_teacher() else None,
        "data": settings.input,
        "excluded": settings.exclude,
        "init_from": settings.student.init_from,
        "init_model_id": (
            cards.read_card(settings.student.init_from).model_id
            if settings.student.init_from
            else None
        ),
        "frozen_blocks": settings.student.frozen_blocks,
        "steps": int(steps),
        "global_batch": settings.global_batch,
        "base_lr": settings.optim.base_lr,
        "train_size": settings.student_size,
        "cached_views": settings.data.cache_views if settings.data.cache else None,
        "loss": settings.loss,
    }


def export_model(
    settings: TrainSettings,
    config: dict[str, Any],
    state: dict[str, Any],
    storage: StorageOptions,
    described: TrainSettings | None = None,
) -> cards.ModelCard:
    """Write <output>/model (card + fp16 safetensors); whiten and calibrate when configured.

    described: the settings as the user wrote them (relative paths), for the card's record.
    """
    model = student_from_state(settings, state)
    mean, std = model_mean_std(settings.student.backbone)
    export = settings.export
    shown = described or settings
    training = training_record(shown, state["step"])
    card = cards.card_for(model, export.input_size, export.resize, mean, std, training=training)
    model_dir = join(settings.output, "model")
    card = cards.save_model(model, card, model_dir, storage)
    source_options = sources.SourceOptions.from_config(config["input"])
    if export.background:
        _, descriptors = embed_images(
            export.background, model_dir, storage, source_options, export.background_max
        )
        white_mean, white_matrix = learn_whitening(descriptors)
        model.set_whitening(torch.from_numpy(white_mean), torch.from_numpy(white_matrix))
        card.training["whitening"] = {
            "background": shown.export.background,
            "images": len(descriptors),
        }
        card = cards.save_model(model, card, model_dir, storage)
    if export.calibration:
        scores, labels, positives = calibration_scores(
            export.calibration, model_dir, storage, source_options
        )
        result = metrics.calibrate_threshold(
            scores, labels, export.target_precision, n_positives=positives
        )
        card.training["calibration"] = {"set": shown.export.calibration, **result.to_dict()}
        cards.write_card(model_dir, card, storage)
        card = cards.with_threshold(model_dir, result.threshold, storage)
    return card
