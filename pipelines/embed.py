"""`rdcd embed INPUT OUT`: images -> descriptors/ + errors/ Parquet on Ray Data.

The plan streams end to end, so memory stays bounded whatever the input size:

    read shard (bytes, id)  ->  decode + resize (CPU tasks)  ->  model (actor pool, one model
    per actor, a GPU each when present)  ->  write parts (tasks)  ->  commit per shard (driver)

Each input shard is committed on its own: its parts are merged, sorted by image_id, written
under a temporary name, moved to descriptors/<shard>.parquet and errors/<shard>.parquet, and
only then marked done in _shards/<shard>.json. A re-run skips marked shards and redoes the
rest, so a killed run resumes to exactly the tables an uninterrupted one writes. manifest.json,
written last, says when the whole output is complete.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import posixpath
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipelines.jobs import JobError, module_main
from rdcd import storage as st
from rdcd.config import ConfigError
from rdcd.preprocess import ImageError, load_rgb
from rdcd.runtime import init_ray
from rdcd.sources import (
    InputShard,
    Listing,
    SourceError,
    SourceOptions,
    ids_digest,
    list_inputs,
    load_ids,
    read_images,
)
from rdcd.tables import ERRORS_SCHEMA, descriptor_array, descriptors_schema

COMMAND = "embed"
HELP = (
    "Embed images (a folder, WebDataset .tar shards or Parquet with image bytes; local or "
    "s3://) into descriptors/ and errors/ Parquet tables."
)

RUN_FILE = "_run.json"
SHARDS_DIR = "_shards"
STAGING_DIR = "_staging"
TABLES = ("descriptors", "errors")
_MB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", help="folder/prefix, .tar shards or .parquet files (any fsspec URL)"
    )
    parser.add_argument("output", help="output folder (local path or s3://...)")
    parser.add_argument(
        "--ids", help="embed only these: .parquet/.csv/.txt of image ids or paths/URLs"
    )
    parser.add_argument(
        "--model",
        help="'default' (shipped card), 'sscd' (the teacher) or a model card path/URL; "
        "overrides model.card",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard existing output and embed everything"
    )


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    if args.model:
        config["model"]["card"] = args.model
    init_ray(config["ray"], args.address)
    return run_embed(args.input, args.output, config, ids=args.ids, overwrite=args.overwrite)


def run_embed(
    input_url: str,
    output_url: str,
    config: dict[str, Any],
    *,
    ids: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Embed input_url into output_url (resuming a partial run); returns the summary.

    The dedup and nightly jobs call this directly; Ray is started from config["ray"] unless it
    already runs.
    """
    init_ray(config["ray"])
    started = time.perf_counter()
    storage = st.StorageOptions.from_config(config["storage"])
    settings = EmbedSettings.from_config(config)
    try:
        source_options = SourceOptions.from_config(config["input"])
        wanted = load_ids(ids, storage) if ids else None
        listing = list_inputs(input_url, source_options, storage, wanted)
    except SourceError as exc:
        raise JobError(str(exc)) from exc
    listed_s = time.perf_counter() - started

    model = describe_model(config["model"], storage)
    out = OutputFolder(output_url, storage)
    spec = {
        "job": COMMAND,
        "input": _normalised(input_url),
        "layout": listing.layout,
        "listing_digest": listing.digest,
        "files_per_shard": source_options.files_per_shard if listing.layout == "files" else None,
        "ids_digest": ids_digest(wanted),
        "model_id": model.model_id,
        "dim": model.dim,
    }
    out.prepare(spec, overwrite)
    done = out.completed_shards()
    pending = [shard for shard in listing.shards if shard.name not in done]
    previous = st.read_manifest(output_url, storage)
    if not pending and previous is not None and previous.get("status") == "complete":
        return _summary(input_url, output_url, model, previous["counts"], 0, listing, 0.0, wanted)

    progress = Progress(pending)
    pipeline_started = time.perf_counter()
    if pending:
        with _own_progress_bar():
            run_pipeline(
                listing, pending, model, settings, source_options, storage, wanted, out, progress
            )
    progress.close()
    pipeline_s = time.perf_counter() - pipeline_started

    finalize_started = time.perf_counter()
    totals = out.totals(listing)
    check_invariants(listing, totals, out, settings)
    finalize_s = time.perf_counter() - finalize_started
    images_per_s = progress.images / pipeline_s if pipeline_s > 0 and progress.images else 0.0
    counts = {
        "inputs": totals["inputs"],
        "descriptors": totals["descriptors"],
        "errors": totals["errors"],
        "errors_by_stage": totals["errors_by_stage"],
        "shards": len(listing.shards),
    }
    manifest = {
        "status": "complete",
        "job": COMMAND,
        "config": _redacted(config),
        "model_id": model.model_id,
        "model": model.describe(),
        "input": listing.describe(),
        "ids": {"url": ids, "count": len(wanted), "digest": spec["ids_digest"]} if wanted else None,
        "counts": counts,
        "this_run": {
            "shards_embedded": len(pending),
            "shards_skipped": len(listing.shards) - len(pending),
            "images": progress.images,
        },
        "throughput": {
            "images_per_s": round(images_per_s, 2),
            "steady_images_per_s": progress.steady_rate and round(progress.steady_rate, 2),
        },
        "timings": {
            "list_s": round(listed_s, 3),
            "pipeline_s": round(pipeline_s, 3),
            "finalize_s": round(finalize_s, 3),
            "model_load_s": round(progress.model_load_s, 3),
            "busy_s": {k: round(v, 3) for k, v in progress.busy.items()},
        },
        "peak_rss_mb": {
            "driver": round(_peak_rss_bytes() / _MB, 1),
            **{k: round(v / _MB, 1) for k, v in progress.peak_rss.items()},
        },
    }
    st.write_manifest(output_url, manifest, storage)
    out.clear_staging()
    return _summary(
        input_url, output_url, model, counts, len(pending), listing, images_per_s, wanted
    )


def _summary(
    input_url: str,
    output_url: str,
    model: ModelInfo,
    counts: dict[str, Any],
    embedded: int,
    listing: Listing,
    images_per_s: float,
    wanted: frozenset[str] | None,
) -> dict[str, Any]:
    """The one-screen summary the CLI prints (and callers like dedup read)."""
    summary: dict[str, Any] = {
        "input": input_url,
        "output": output_url,
        "model": f"{model.spec} ({model.model_id}, d={model.dim})",
        "inputs": counts["inputs"],
        "descriptors": counts["descriptors"],
        "errors": counts["errors"],
        "shards embedded / skipped": f"{embedded} / {len(listing.shards) - embedded}",
        "images/s (this run)": round(images_per_s, 1),
    }
    if counts["errors_by_stage"]:
        summary["errors by stage"] = ", ".join(
            f"{stage}: {n}" for stage, n in sorted(counts["errors_by_stage"].items())
        )
    if wanted is not None:
        summary["ids requested / not found"] = (
            f"{len(wanted)} / {max(0, len(wanted) - counts['inputs'])}"
        )
    return summary


def _normalised(url: str) -> str:
    """One spelling per location, so `photos/` and `./photos` resume the same output."""
    if st.protocol_of(url) == "file":
        return st.strip_protocol(url).rstrip("/") or "/"
    return url.rstrip("/")


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config for the manifest, without storage secrets."""
    recorded = copy.deepcopy(config)
    for key in ("key", "secret"):
        if recorded.get("storage", {}).get(key):
            recorded["storage"][key] = "***"
    return recorded


@dataclass(frozen=True)
class EmbedSettings:
    """The embed: section plus the model placement it implies."""

    batch_size: int
    write_batch_size: int
    actors: int | None
    actor_num_cpus: float | None
    decode_num_cpus: float
    write_num_cpus: float
    max_tasks_in_flight_per_actor: int
    commit_threads: int
    unique_check_max_rows: int
    max_pixels: int
    draft: bool
    device: str
    runtime: str
    threads: int | None
    onnx_cache: str | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EmbedSettings:
        embed, model, pre = config["embed"], config["model"], config["preprocess"]
        for key in ("batch_size", "write_batch_size"):
            if int(embed[key]) < 1:
                raise ConfigError(f"embed.{key} must be >= 1, got {embed[key]}")
        return cls(
            batch_size=int(embed["batch_size"]),
            write_batch_size=int(embed["write_batch_size"]),
            actors=embed["actors"],
            actor_num_cpus=embed["actor_num_cpus"],
            decode_num_cpus=float(embed["decode_num_cpus"]),
            write_num_cpus=float(embed["write_num_cpus"]),
            max_tasks_in_flight_per_actor=int(embed["max_tasks_in_flight_per_actor"]),
            commit_threads=max(1, int(embed["commit_threads"])),
            unique_check_max_rows=int(embed["unique_check_max_rows"]),
            max_pixels=int(pre["max_pixels"]),
            draft=bool(pre["draft"]),
            device=str(model["device"]),
            runtime=str(model["runtime"]),
            threads=model["threads"],
            onnx_cache=model["onnx_cache"],
        )


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    model_id: str
    dim: int
    input_size: int
    resize: str
    cpu_only: bool = False
    """An int8 model: its actors run on CPU even on GPU nodes."""

    def describe(self) -> dict[str, Any]:
        return {
            "card": self.spec,
            "model_id": self.model_id,
            "dim": self.dim,
            "input_size": self.input_size,
            "resize": self.resize,
        }


def describe_model(model_config: dict[str, Any], storage: st.StorageOptions) -> ModelInfo:
    """The model's id, d and input handling, read on the driver before any cluster work, so a
    bad card fails fast. Cards and SSCD are described without loading any weights."""
    from rdcd.cards import read_card
    from rdcd.embedder import load_embedder
    from rdcd.teachers import sscd_onnx

    spec = str(model_config["card"])
    try:
        if spec == "sscd":
            teacher = sscd_onnx()
            return ModelInfo(
                spec, teacher.model_id, teacher.dim, teacher.input_size, teacher.resize
            )
        if spec.startswith(("torchscript:", "timm:")):
            embedder = load_embedder(spec, device="cpu", runtime="torch", storage=storage)
            return ModelInfo(
                spec, embedder.model_id, embedder.dim, embedder.input_size, embedder.resize
            )
        card = read_card(spec, storage)
    except (OSError, ValueError, RuntimeError) as exc:
        raise JobError(f"cannot load model {spec!r}: {exc}") from exc
    return ModelInfo(
        spec,
        card.model_id,
        card.output_dim,
        card.input.size,
        card.input.resize,
        cpu_only=card.quantization is not None,
    )


class OutputFolder:
    """The embed output layout and its resume bookkeeping."""

    def __init__(self, url: str, storage: st.StorageOptions) -> None:
        self.url = url
        self.storage = storage
        self.fs = st.get_filesystem(url, storage)
        self.path = st.strip_protocol(url)

    def sub(self, *parts: str) -> str:
        return st.join(self.url, *parts)

    def prepare(self, spec: dict[str, Any], overwrite: bool) -> None:
        """Check that a partial/complete output belongs to this run; start a fresh one."""
        bucket = self.path.split("/", 1)[0]
        if st.protocol_of(self.url) != "file" and not self.fs.exists(bucket):
            # makedirs would create the bucket: a typo must not do that.
            raise JobError(f"output bucket {bucket!r} does not exist ({self.url})")
        try:
            self.fs.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise JobError(f"cannot create output {self.url}: {type(exc).__name__}: {exc}") from exc
        if overwrite:
            self.remove_all()
        run_url = self.sub(RUN_FILE)
        if st.exists(run_url, self.storage):
            previous = st.read_json(run_url, self.storage)
            _check_same_run(previous, spec, self.url)
        else:
            leftovers = [
                name for name in (*TABLES, SHARDS_DIR, st.MANIFEST) if self.fs.exists(self._p(name))
            ]
            if leftovers:
                raise JobError(
                    f"{self.url} already holds {', '.join(leftovers)} from another job; "
                    "use an empty output folder or --overwrite"
                )
            st.write_json_atomic(run_url, spec, self.storage)
        self.clear_staging()
        for name in (*TABLES, SHARDS_DIR):
            self.fs.makedirs(self._p(name), exist_ok=True)

    def remove_all(self) -> None:
        for name in (*TABLES, SHARDS_DIR, STAGING_DIR, st.MANIFEST, RUN_FILE):
            if self.fs.exists(self._p(name)):
                self.fs.rm(self._p(name), recursive=True)
        self.fs.invalidate_cache()

    def clear_staging(self) -> None:
        if self.fs.exists(self._p(STAGING_DIR)):
            self.fs.rm(self._p(STAGING_DIR), recursive=True)
        self.fs.invalidate_cache()

    def completed_shards(self) -> set[str]:
        self.fs.invalidate_cache()
        if not self.fs.exists(self._p(SHARDS_DIR)):
            return set()
        names = self.fs.ls(self._p(SHARDS_DIR), detail=False)
        return {posixpath.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def markers(self, listing: Listing) -> list[dict[str, Any]]:
        paths = [self._p(SHARDS_DIR, f"{shard.name}.json") for shard in listing.shards]
        contents = self.fs.cat(paths) if paths else {}
        return [json.loads(contents[p]) for p in paths]

    def totals(self, listing: Listing) -> dict[str, Any]:
        markers = self.markers(listing)
        by_stage: Counter[str] = Counter()
        for marker in markers:
            by_stage.update(marker["errors_by_stage"])
        return {
            "inputs": sum(m["inputs"] for m in markers),
            "descriptors": sum(m["descriptors"] for m in markers),
            "errors": sum(m["errors"] for m in markers),
            "errors_by_stage": dict(by_stage),
        }

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)


def _check_same_run(previous: dict[str, Any], spec: dict[str, Any], url: str) -> None:
    if (previous.get("model_id"), previous.get("dim")) != (spec["model_id"], spec["dim"]):
        raise JobError(
            f"{url} holds descriptors of model {previous.get('model_id')} "
            f"(d={previous.get('dim')}); this run uses {spec['model_id']} (d={spec['dim']}). "
            "One output folder holds one model: use another folder or --overwrite"
        )
    for key, what in (
        ("input", "input URL"),
        ("layout", "input layout"),
        ("listing_digest", "input listing (objects added, removed or changed)"),
        ("files_per_shard", "input.files_per_shard"),
        ("ids_digest", "--ids subset"),
    ):
        if previous.get(key) != spec[key]:
            raise JobError(
                f"{url} was started with a different {what} ({previous.get(key)!r} vs "
                f"{spec[key]!r}); use another output folder or --overwrite"
            )


class Progress:
    """One bar over images, plus what the parts report: busy seconds per stage, peak RSS per
    kind of worker, the model actors' load time and when the first model batch started.

    The steady rate counts from that first model batch, leaving out the start-up (Ray, actors
    importing torch and loading the model) that dominates small runs."""

    def __init__(self, pending: list[InputShard]) -> None:
        from tqdm.auto import tqdm

        counts = [shard.count for shard in pending]
        total = None if any(c is None for c in counts) else sum(counts)
        self.bar = tqdm(total=total, unit="img", desc="embed", dynamic_ncols=True)
        self.images = 0
        self.busy: Counter[str] = Counter()
        self.peak_rss: dict[str, int] = {}
        self.model_load_s = 0.0
        self._first_model_batch: float | None = None
        self._last = 0.0

    def update(self, meta: dict[str, Any]) -> None:
        self.images += meta["rows"]
        self.bar.update(meta["rows"])
        self._last = time.time()
        if meta["embed_started"] is not None:
            first = self._first_model_batch
            self._first_model_batch = min(first or meta["embed_started"], meta["embed_started"])
        self.model_load_s = max(self.model_load_s, meta["model_load_s"])
        for stage in ("decode", "embed", "write"):
            self.busy[stage] += meta[f"{stage}_s"]
            key = f"{stage}_worker"
            self.peak_rss[key] = max(self.peak_rss.get(key, 0), meta[f"{stage}_rss"])

    @property
    def steady_rate(self) -> float | None:
        if self._first_model_batch is None or self._last <= self._first_model_batch:
            return None
        return self.images / (self._last - self._first_model_batch)

    def close(self) -> None:
        self.bar.close()


def run_pipeline(
    listing: Listing,
    pending: list[InputShard],
    model: ModelInfo,
    settings: EmbedSettings,
    source_options: SourceOptions,
    storage: st.StorageOptions,
    wanted: frozenset[str] | None,
    out: OutputFolder,
    progress: Progress,
) -> None:
    """Stream every pending shard through decode -> model -> parts, committing shards as
    their last row lands."""
    from ray.data import ActorPoolStrategy

    placement = place_model(settings, model)
    dataset = read_images(
        listing,
        source_options,
        storage,
        ids=wanted,
        shards=pending,
        end_markers=True,
        num_cpus=settings.decode_num_cpus,
    )
    dataset = dataset.map_batches(
        decode_batch,
        # Whole read blocks (input.block_rows images): Ray Data then fuses read and decode
        # into one task, so encoded bytes never pass through the object store.
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=settings.decode_num_cpus,
        fn_kwargs={
            "size": model.input_size,
            "policy": model.resize,
            "max_pixels": settings.max_pixels,
            "draft": settings.draft,
        },
    )
    dataset = dataset.map_batches(
        EmbedStage,
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            size=placement["actors"],
            max_tasks_in_flight_per_actor=settings.max_tasks_in_flight_per_actor,
        ),
        num_cpus=placement["num_cpus"],
        num_gpus=placement["num_gpus"],
        fn_constructor_kwargs={
            "spec": model.spec,
            "device": placement["device"],
            "runtime": settings.runtime,
            "threads": placement["threads"],
            "storage": storage,
            "cache_dir": settings.onnx_cache,
            "model_id": model.model_id,
        },
    )
    dataset = dataset.map_batches(
        write_parts,
        batch_size=settings.write_batch_size,
        batch_format="pyarrow",
        num_cpus=settings.write_num_cpus,
        fn_kwargs={"staging_url": out.sub(STAGING_DIR), "storage": storage},
    )

    expected: dict[str, int] = {}
    seen: Counter[str] = Counter()
    parts: dict[str, list[str]] = {shard.name: [] for shard in pending}
    by_name = {shard.name: shard for shard in pending}
    # Commits move only descriptor-sized data (a few hundred bytes per image): driver threads
    # keep up with a large cluster and, unlike remote tasks, start no worker processes.
    with ThreadPoolExecutor(settings.commit_threads, thread_name_prefix="commit") as pool:
        commits = []
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for meta in batch.to_pylist():
                name = meta["shard"]
                progress.update(meta)
                seen[name] += meta["rows"]
                if meta["part"]:
                    parts[name].append(meta["part"])
                if meta["shard_end"] >= 0:
                    expected[name] = meta["shard_end"]
                if name in expected and seen[name] == expected[name]:
                    commits.append(
                        pool.submit(
                            commit_shard,
                            out.url,
                            by_name[name],
                            parts.pop(name),
                            expected[name],
                            model.model_id,
                            model.dim,
                            storage,
                        )
                    )
        for commit in commits:
            commit.result()
    unfinished = sorted(set(by_name) - set(expected))
    if unfinished or parts:
        raise JobError(
            f"internal error: shards {unfinished or sorted(parts)} never completed; "
            "re-run the same command to retry them"
        )


@contextmanager
def _own_progress_bar() -> Iterator[None]:
    """Ray Data's per-operator bars and notices off while our one bar over images runs (set
    before the dataset is built: it copies the context), restored afterwards for the caller."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    context = DataContext.get_current()
    names = ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats")
    saved = {name: getattr(context, name) for name in names}
    logger = logging.getLogger("ray.data")
    level = logger.level
    for name in names:
        setattr(context, name, False)
    log_once("ray_data_progress_manager_disabled")
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        logger.setLevel(level)


def place_model(settings: EmbedSettings, model: ModelInfo) -> dict[str, Any]:
    """Actors, devices and resources: one actor per GPU when the cluster has GPUs (and the
    model is not a CPU-only int8 one), else CPU actors with fractional CPU requests (whole-CPU
    actors starve the read tasks on small machines and the pipeline stalls silently)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    device = settings.device
    if device == "cuda" and model.cpu_only:
        raise JobError(f"model.device is 'cuda' but {model.model_id} is an int8 model for CPUs")
    if device == "cuda" and gpus == 0:
        raise JobError("model.device is 'cuda' but the Ray cluster has no GPUs")
    if model.cpu_only:
        gpus = 0
    use_gpu = gpus > 0 and device in ("auto", "cuda")
    if use_gpu:
        actors = int(settings.actors or gpus)
        num_cpus = float(settings.actor_num_cpus or 1.0)
        return {
            "actors": actors,
            "num_gpus": 1,
            "num_cpus": num_cpus,
            "device": "cuda",
            "threads": settings.threads or max(1, int(num_cpus)),
        }
    actors = int(settings.actors or max(1, cpus // 8))
    num_cpus = float(settings.actor_num_cpus or 0.5)
    if num_cpus == settings.decode_num_cpus:
        raise ConfigError(
            "embed.actor_num_cpus must differ from embed.decode_num_cpus on CPU: with equal "
            "requests Ray Data fuses decoding into the model actors and loses the overlap"
        )
    return {
        "actors": actors,
        "num_gpus": 0,
        "num_cpus": num_cpus,
        "device": "cpu",
        "threads": settings.threads or max(1, cpus // actors),
    }


def decode_batch(
    table: pa.Table, *, size: int, policy: str, max_pixels: int, draft: bool
) -> pa.Table:
    """Bytes -> resized RGB pixels, content hash and original size; a bad image becomes an
    error row (stage from the decoder), never an exception."""
    started = time.perf_counter()
    n = table.num_rows
    pixels: list[bytes] = [b""] * n
    shapes = np.zeros((n, 2), dtype=np.int32)
    hashes: list[str | None] = [None] * n
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    stages = table.column("stage").to_pylist()
    errors = table.column("error").to_pylist()
    ids = table.column("image_id").to_pylist()
    for i, data in enumerate(table.column("bytes").to_pylist()):
        if ids[i] is None or stages[i] is not None:
            continue
        hashes[i] = hashlib.sha256(data).hexdigest()
        try:
            array, (width, height) = load_rgb(
                data, size=size, policy=policy, max_pixels=max_pixels, draft=draft
            )
        except ImageError as exc:
            stages[i], errors[i] = exc.stage, str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one odd file must never stop the job
            stages[i], errors[i] = "decode", f"{type(exc).__name__}: {exc}"
            continue
        pixels[i] = array.tobytes()
        shapes[i] = array.shape[:2]
        widths[i], heights[i] = width, height
    columns = {
        "shard": table.column("shard"),
        "image_id": table.column("image_id"),
        "uri": table.column("uri"),
        "content_hash": pa.array(hashes, pa.string()),
        "width": pa.array(widths),
        "height": pa.array(heights),
        "pixels": pa.array(pixels, pa.binary()),
        "pixels_h": pa.array(shapes[:, 0]),
        "pixels_w": pa.array(shapes[:, 1]),
        "stage": pa.array(stages, pa.string()),
        "error": pa.array(errors, pa.string()),
        "shard_end": table.column("shard_end"),
        **_stats_columns("decode", time.perf_counter() - started, n),
    }
    return pa.table(columns)


class EmbedStage:
    """A model actor: loads the embedder once, then embeds the good rows of each batch.

    torch and the model code are imported here and in describe_model only, so the many decode
    and write workers never load them (hundreds of MB each)."""

    def __init__(
        self,
        spec: str,
        device: str,
        runtime: str,
        threads: int | None,
        storage: st.StorageOptions,
        cache_dir: str | None,
        model_id: str,
    ) -> None:
        from rdcd.embedder import load_embedder

        started = time.perf_counter()
        self.embedder = load_embedder(
            spec,
            device=device,
            runtime=runtime,
            threads=threads,
            storage=storage,
            cache_dir=cache_dir,
        )
        if self.embedder.model_id != model_id:
            raise RuntimeError(
                f"model {spec!r} is {self.embedder.model_id} on this worker but "
                f"{model_id} on the driver: the card changed during the run"
            )
        self.load_s = time.perf_counter() - started

    def __call__(self, table: pa.Table) -> pa.Table:
        started, wall_clock = time.perf_counter(), time.time()
        n = table.num_rows
        good = pc.and_(pc.is_valid(table.column("image_id")), pc.is_null(table.column("stage")))
        good = np.asarray(good.to_numpy(zero_copy_only=False), dtype=bool)
        descriptors = np.zeros((n, self.embedder.dim), dtype=np.float16)
        if good.any():
            images = _pixels(table, good)
            # Same-size images share one model call (every image, for square models).
            for (h, w), rows in _group_by_shape(table, good).items():
                batch = np.stack([images[i].reshape(h, w, 3) for i in rows])
                descriptors[rows] = self.embedder.embed(batch)
        table = table.drop_columns(["pixels", "pixels_h", "pixels_w"]).append_column(
            "descriptor", descriptor_array(descriptors)
        )
        stats = {
            **_stats_columns("embed", time.perf_counter() - started, n),
            "embed_started": pa.array(np.full(n, wall_clock)),
            "model_load_s": pa.array(np.full(n, self.load_s)),
        }
        for name, column in stats.items():
            table = table.append_column(name, column)
        return table


def _pixels(table: pa.Table, good: np.ndarray) -> dict[int, np.ndarray]:
    """Row index -> flat uint8 view of its pixels (no copy of the binary column's data)."""
    array = table.column("pixels").combine_chunks()
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset :]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    return {int(i): data[offsets[i] : offsets[i + 1]] for i in np.flatnonzero(good)}


def _group_by_shape(table: pa.Table, good: np.ndarray) -> dict[tuple[int, int], list[int]]:
    heights = table.column("pixels_h").to_numpy()
    widths = table.column("pixels_w").to_numpy()
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(good):
        groups.setdefault((int(heights[i]), int(widths[i])), []).append(int(i))
    return groups


STAGING_SCHEMA_FIELDS = ("image_id", "uri", "content_hash", "width", "height", "descriptor")


def write_parts(table: pa.Table, *, staging_url: str, storage: st.StorageOptions) -> pa.Table:
    """Write each shard's rows of this batch as one part file; report what was written."""
    started = time.perf_counter()
    fs = st.get_filesystem(staging_url, storage)
    metas = []
    shards = table.column("shard")
    for name in pc.unique(shards).to_pylist():
        rows = table.filter(pc.equal(shards, name))
        ends = rows.column("shard_end").drop_null().to_pylist()
        data = rows.filter(pc.is_valid(rows.column("image_id")))
        part = ""
        if data.num_rows:
            part = posixpath.join(
                st.strip_protocol(staging_url), name, f"part-{uuid.uuid4().hex}.parquet"
            )
            fs.makedirs(posixpath.dirname(part), exist_ok=True)
            with fs.open(part, "wb") as handle:
                pq.write_table(data.select([*STAGING_SCHEMA_FIELDS, "stage", "error"]), handle)
        metas.append(
            {
                "shard": name,
                "rows": data.num_rows,
                "shard_end": ends[0] if ends else -1,
                "part": part,
                "decode_s": pc.sum(rows.column("decode_s")).as_py() or 0.0,
                "embed_s": pc.sum(rows.column("embed_s")).as_py() or 0.0,
                "decode_rss": pc.max(rows.column("decode_rss")).as_py() or 0,
                "embed_rss": pc.max(rows.column("embed_rss")).as_py() or 0,
                "embed_started": pc.min(rows.column("embed_started")).as_py(),
                "model_load_s": pc.max(rows.column("model_load_s")).as_py() or 0.0,
            }
        )
    elapsed = time.perf_counter() - started
    rss = _peak_rss_bytes()
    for meta in metas:
        meta["write_s"] = elapsed / len(metas)
        meta["write_rss"] = rss
    return pa.Table.from_pylist(metas, schema=META_SCHEMA)


META_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("rows", pa.int64()),
        ("shard_end", pa.int64()),
        ("part", pa.string()),
        ("decode_s", pa.float64()),
        ("embed_s", pa.float64()),
        ("decode_rss", pa.int64()),
        ("embed_rss", pa.int64()),
        ("write_s", pa.float64()),
        ("write_rss", pa.int64()),
        ("embed_started", pa.float64()),
        ("model_load_s", pa.float64()),
    ]
)


def commit_shard(
    output_url: str,
    shard: InputShard,
    parts: list[str],
    expected: int,
    model_id: str,
    dim: int,
    storage: st.StorageOptions,
) -> dict[str, Any]:
    """Merge a finished shard's parts into its two tables, publish them, then mark it done."""
    fs = st.get_filesystem(output_url, storage)
    root = st.strip_protocol(output_url)
    tables = []
    for part in parts:
        with fs.open(part, "rb") as handle:
            tables.append(pq.read_table(handle))
    schema = descriptors_schema(dim)
    if tables:
        merged = pa.concat_tables(tables).sort_by("image_id")
    else:
        fields = [schema.field(n) for n in STAGING_SCHEMA_FIELDS]
        merged = pa.schema([*fields, ("stage", pa.string()), ("error", pa.string())]).empty_table()
    if merged.num_rows != expected:
        raise RuntimeError(f"shard {shard.name}: {merged.num_rows} rows, expected {expected}")
    if pc.count_distinct(merged.column("image_id")).as_py() != merged.num_rows:
        raise RuntimeError(f"shard {shard.name}: an image_id occurs twice")
    good = pc.is_null(merged.column("stage"))
    ok = merged.filter(good)
    descriptors = pa.table(
        {
            **{n: ok.column(n) for n in STAGING_SCHEMA_FIELDS},
            "model_id": pa.array([model_id] * ok.num_rows, pa.string()),
        }
    ).cast(schema)
    bad = merged.filter(pc.invert(good))
    errors = bad.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
    staging = posixpath.join(root, STAGING_DIR, shard.name)
    fs.makedirs(staging, exist_ok=True)
    for table_name, table in (("descriptors", descriptors), ("errors", errors)):
        tmp = posixpath.join(staging, f"{table_name}-{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
        fs.mv(tmp, posixpath.join(root, table_name, f"{shard.name}.parquet"))
    marker = {
        "shard": shard.name,
        "sources": list(shard.paths[:1]) if shard.layout != "files" else [],
        "inputs": merged.num_rows,
        "descriptors": descriptors.num_rows,
        "errors": errors.num_rows,
        "errors_by_stage": dict(Counter(errors.column("stage").to_pylist())),
    }
    st.write_json_atomic(st.join(output_url, SHARDS_DIR, f"{shard.name}.json"), marker, storage)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    return marker


def check_invariants(
    listing: Listing, totals: dict[str, Any], out: OutputFolder, settings: EmbedSettings
) -> None:
    """descriptors + errors = inputs listed, and no image_id twice across shards.

    Folder ids (relative paths) are unique by construction and commits check each shard, so
    only tar keys and Parquet ids are checked across shards, up to unique_check_max_rows."""
    if totals["descriptors"] + totals["errors"] != totals["inputs"]:
        raise JobError(f"{out.url}: descriptors + errors != inputs; re-run with --overwrite")
    if listing.count is not None and totals["inputs"] != listing.count:
        raise JobError(
            f"{out.url}: {totals['inputs']} rows for {listing.count} listed inputs; "
            "re-run with --overwrite"
        )
    if (
        listing.layout == "files"
        or len(listing.shards) < 2
        or totals["inputs"] > settings.unique_check_max_rows
    ):
        return
    files = [out._p(table, f"{shard.name}.parquet") for table in TABLES for shard in listing.shards]
    filesystem = st.get_pyarrow_filesystem(out.url, out.storage)
    column = ds.dataset(files, filesystem=filesystem, format="parquet").to_table(
        columns=["image_id"]
    )["image_id"]
    distinct = pc.count_distinct(column).as_py()
    if distinct != len(column):
        counts = pc.value_counts(column)
        repeated = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:3]
        advice = (
            "set input.tar_id=shard_key for WebDataset sets whose keys repeat across tars"
            if listing.layout == "tar"
            else f"make the {listing.layout} id column unique"
        )
        raise JobError(
            f"{len(column) - distinct} image_ids occur in more than one shard (e.g. {repeated}); "
            f"{advice}, then re-run with --overwrite"
        )


def _stats_columns(stage: str, elapsed: float, n: int) -> dict[str, pa.Array]:
    """Per-row share of a batch's busy time and the worker's peak RSS, summed downstream."""
    return {
        f"{stage}_s": pa.array(np.full(n, elapsed / max(n, 1))),
        f"{stage}_rss": pa.array(np.full(n, _peak_rss_bytes(), dtype=np.int64)),
    }


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which exec resets (ru_maxrss is
    inherited from the parent, so a driver started by a big process would report its peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
