"""What every stage of an incremental run shares: which model and settings it runs with,
where its stage results live, the crash hook, and small Parquet and Ray helpers.

A run records each finished stage's result in work/<run_id>/_stages/<stage>.json and skips
finished stages when re-run. RDCD_STOP_AFTER=<stage> makes the process exit hard right after
that stage (the kill-and-resume tests use it; it is a real crash, nothing is cleaned up).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.jobs import JobError
from rdcd import drift
from rdcd import storage as st
from rdcd.groups import check_policy
from rdcd.history import History, State, Version
from rdcd.live_index import Span
from rdcd.shipped import resolve_model_dir

STAGES = ("list", "embed", "ingest", "index", "pairs", "groups", "commit", "finalize")
STOP_ENV = "RDCD_STOP_AFTER"
STOP_EXIT_CODE = 75


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a run embeds with: it names the history version the run belongs to."""

    spec: str
    model_id: str
    dim: int
    threshold: float | None = None


def model_identity(spec: str, storage: st.StorageOptions) -> ModelIdentity:
    """model_id and d of a model spec; student cards are read as JSON (no torch import), so
    resuming a run past its embed stage starts in seconds."""
    directory = resolve_model_dir(spec)
    card_url = st.join(directory, "card.json")
    if not spec.startswith(("sscd", "timm:", "torchscript:")) and st.exists(card_url, storage):
        card = st.read_json(card_url, storage)
        whitening = card.get("whitening") or {}
        dim = whitening.get("dim") if whitening.get("present") else card["architecture"]["dim"]
        return ModelIdentity(spec, str(card["model_id"]), int(dim), card.get("threshold"))
    from pipelines.embed import describe_model

    info = describe_model({"card": spec, "device": "cpu", "runtime": "torch"}, storage)
    return ModelIdentity(spec, info.model_id, info.dim)


@dataclass(frozen=True)
class Settings:
    """What a run needs from the config, resolved and checked once."""

    k: int
    nprobe: int
    threshold: float
    query_rows: int
    exact_duplicates: bool
    task_cpus: float
    keep_policy: list[str]
    file_sizes: str
    max_index_parts: int
    group_buckets: int
    bounds: drift.DriftBounds
    usd_per_hour: float
    hardware: str

    @classmethod
    def from_config(cls, config: dict[str, Any], threshold: float) -> Settings:
        night, m, g = config["nightly"], config["match"], config["groups"]
        if m["background"]:
            raise JobError(
                "match.background (score normalisation) is not supported by incremental runs: "
                "a night's new images would need the background offsets of the whole history"
            )
        if g["file_sizes"] not in ("stat", "off"):
            raise JobError(f"groups.file_sizes must be stat or off, got {g['file_sizes']!r}")
        for key in ("max_index_parts", "group_buckets"):
            if int(night[key]) < 1:
                raise JobError(f"nightly.{key} must be >= 1, got {night[key]}")
        return cls(
            k=int(m["k"]),
            nprobe=int(m["nprobe"]),
            threshold=float(threshold),
            query_rows=int(m["query_rows"]),
            exact_duplicates=bool(m["exact_duplicates"]),
            task_cpus=float(night["task_cpus"]),
            keep_policy=check_policy(g["keep_policy"]),
            file_sizes=str(g["file_sizes"]),
            max_index_parts=int(night["max_index_parts"]),
            group_buckets=int(night["group_buckets"]),
            bounds=drift.DriftBounds.from_config(night["drift"]),
            usd_per_hour=float(night["cost"]["usd_per_hour"]),
            hardware=str(night["cost"]["hardware"]),
        )

    def recorded(self) -> dict[str, Any]:
        """The settings that must stay fixed for the life of a version (pairs of every run
        must mean the same thing)."""
        return {
            "threshold": self.threshold,
            "k": self.k,
            "exact_duplicates": self.exact_duplicates,
            "keep_policy": self.keep_policy,
            "group_buckets": self.group_buckets,
        }


@dataclass
class Run:
    """One run of one version: where its stage results live and how to stop after a stage."""

    config: dict[str, Any]
    storage: st.StorageOptions
    history: History
    version: Version
    model: ModelIdentity
    settings: Settings
    run_id: str
    kind: str
    date: str
    input_url: str
    ids_url: str | None = None
    """Parquet/CSV of exactly the image ids to admit (a backfill replaying a run)."""

    def work(self, *parts: str) -> str:
        return self.version.sub("work", self.run_id, *parts)

    def done(self, stage: str) -> dict[str, Any] | None:
        url = self.work("_stages", f"{stage}.json")
        return st.read_json(url, self.storage) if st.exists(url, self.storage) else None

    def finish(self, stage: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        payload = {"stage": stage, "seconds": round(seconds, 3), **result}
        st.write_json_atomic(self.work("_stages", f"{stage}.json"), payload, self.storage)
        stop_if_asked(stage)
        return payload

    def stage(self, name: str, body) -> dict[str, Any]:
        """body()'s result, recorded with its seconds; a finished stage's recorded result."""
        result = self.done(name)
        if result is None:
            started = time.perf_counter()
            result = self.finish(name, body(), time.perf_counter() - started)
        return result


def stop_if_asked(stage: str) -> None:
    """Fault injection for the kill-and-resume tests: die without any cleanup."""
    if os.environ.get(STOP_ENV) == stage:
        print(f"{STOP_ENV}={stage}: stopping hard", flush=True)
        os._exit(STOP_EXIT_CODE)


def open_version(history: History, model: ModelIdentity, settings: Settings, kind: str) -> Version:
    """The model's version, created on first use; its fixed settings must not have changed."""
    version = history.version(model.model_id)
    info = version.create(model.dim, kind, {"card": model.spec, **settings.recorded()})
    recorded = {k: info["model"].get(k) for k in settings.recorded()}
    if recorded != settings.recorded():
        changed = sorted(k for k, v in settings.recorded().items() if recorded.get(k) != v)
        raise JobError(
            f"{version.url} was built with {', '.join(f'{k}={recorded[k]}' for k in changed)}; "
            f"this run asks for {', '.join(f'{k}={settings.recorded()[k]}' for k in changed)}. "
            "Pairs of one version must mean the same thing: restore the settings, or build a "
            "new version with `rdcd backfill`"
        )
    return version


def history_spans(state: State) -> list[Span]:
    return [Span(r.run_id, r.first_id, r.count) for r in state.runs]


def read_parquet(url: str, storage: st.StorageOptions, schema: pa.Schema | None = None):
    """One Parquet file of a work or history folder, on any filesystem."""
    with st.get_filesystem(url, storage).open(st.strip_protocol(url), "rb") as handle:
        return pq.read_table(handle, schema=schema)


def write_parquet(table: pa.Table, url: str, storage: st.StorageOptions) -> None:
    """One Parquet file written atomically (readers see all of it or none)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    st.write_bytes_atomic(url, buffer.getvalue(), storage)
