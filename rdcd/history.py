"""Where the nightly dedup keeps its history, which model version is current, and what ran.

One history root holds every model version side by side; a version is only ever written by runs
of its own model, so tables of two models can never mix. Layout (any fsspec URL):

    HISTORY/
      current.json                    the version readers use; replaced atomically (switch)
      runs/date=D/<run_id>.parquet    one summary row per run, all versions (rdcd/runlog.py)
      versions/<model_id>/
        version.json                  model, dim, how it was built, status building|complete
        state.json                    the ledger: runs applied in order, ids used, live index
        work/<run_id>/                a run's work folder: stage results, its manifest
        descriptors/date=D/<run_id>.parquet   published tables, hive-partitioned by run date
        pairs/date=D/<run_id>.parquet
        group_changes/date=D/<run_id>.parquet
        errors/date=D/<run_id>.parquet
        groups/bucket=NNNN/           the current groups snapshot, bucketed by group_id
        index/                        the live index (rdcd/live_index.py)

state.json is the commit point of every run: a run's files become part of the history when
the ledger lists it, so a run killed anywhere before that is simply redone.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rdcd import storage as st

CURRENT_FILE = "current.json"
VERSION_FILE = "version.json"
STATE_FILE = "state.json"
STATE_FORMAT = "rdcd-history/1"
TABLES = ("descriptors", "pairs", "group_changes", "errors")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


class HistoryError(ValueError):
    """A history that cannot be used as asked (missing, unfinished run, wrong order)."""


class ModelMismatchError(HistoryError):
    """Descriptors, indexes or tables of two different models met; they must never mix."""


def parse_date(text: str | None) -> str:
    """An ISO date (YYYY-MM-DD); None means today in UTC, the nightly default."""
    if text is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    if not _DATE.match(str(text)):
        raise HistoryError(f"date must look like YYYY-MM-DD, got {text!r}")
    try:
        return dt.date.fromisoformat(str(text)).isoformat()
    except ValueError as exc:
        raise HistoryError(f"not a calendar date: {text!r}") from exc


def check_model(found: str | None, expected: str, what: str) -> None:
    """Refuse to combine data of two models: the clear error requirement 3 asks for."""
    if found != expected:
        raise ModelMismatchError(
            f"{what} belongs to model {found!r} but this history version is {expected!r}; "
            "descriptors, indexes and tables of different models are never mixed "
            "(run `rdcd backfill` to build a version for a new model)"
        )


def check_table_model(table: pa.Table, expected: str, what: str) -> None:
    """Every row's model_id must be the version's model."""
    if table.num_rows == 0:
        return
    if "model_id" not in table.column_names:
        raise ModelMismatchError(f"{what} has no model_id column; cannot tell which model made it")
    found = pc.unique(table.column("model_id")).to_pylist()
    if found != [expected]:
        others = sorted(str(v) for v in found if v != expected)
        check_model(others[0] if others else None, expected, what)


@dataclass(frozen=True)
class History:
    """The history root: versions side by side, the current pointer, the runs table."""

    url: str
    storage: st.StorageOptions

    @property
    def current_url(self) -> str:
        return st.join(self.url, CURRENT_FILE)

    @property
    def runs_url(self) -> str:
        return st.join(self.url, "runs")

    def version(self, model_id: str) -> Version:
        if not _SAFE_ID.match(model_id):
            raise HistoryError(f"model_id {model_id!r} cannot name a folder")
        return Version(st.join(self.url, "versions", model_id), model_id, self.storage)

    def current(self) -> dict[str, Any] | None:
        """The current pointer ({model_id, switched_at, previous, reason}), None before any."""
        if not st.exists(self.current_url, self.storage):
            return None
        return st.read_json(self.current_url, self.storage)

    def current_model(self) -> str | None:
        pointer = self.current()
        return pointer["model_id"] if pointer else None

    def switch(self, model_id: str, reason: str) -> dict[str, Any]:
        """Point `current` at a complete version: one small JSON written atomically, so a
        reader sees the old version or the new one, never a mixture."""
        version = self.version(model_id)
        info = version.info()
        if info is None or info.get("status") != "complete":
            raise HistoryError(
                f"version {model_id} is not complete (status "
                f"{None if info is None else info.get('status')!r}); not switching to it"
            )
        previous = self.current_model()
        pointer = {
            "model_id": model_id,
            "version": f"versions/{model_id}",
            "dim": info["dim"],
            "previous": previous,
            "reason": reason,
            "switched_at": _now(),
        }
        st.write_json_atomic(self.current_url, pointer, self.storage)
        return pointer


@dataclass(frozen=True)
class Version:
    """One model's history: its own tables, index and ledger."""

    url: str
    model_id: str
    storage: st.StorageOptions

    def sub(self, *parts: str) -> str:
        return st.join(self.url, *parts)

    def table(self, name: str, date: str) -> str:
        """A published date partition, e.g. pairs/date=2026-11-28."""
        if name not in TABLES:
            raise HistoryError(f"unknown history table {name!r}")
        return self.sub(name, f"date={date}")

    def info(self) -> dict[str, Any] | None:
        url = self.sub(VERSION_FILE)
        return st.read_json(url, self.storage) if st.exists(url, self.storage) else None

    def create(self, dim: int, kind: str, model: dict[str, Any]) -> dict[str, Any]:
        """Write version.json (status building) unless it exists; check it is this model."""
        info = self.info()
        if info is not None:
            check_model(info.get("model_id"), self.model_id, f"{self.url}/{VERSION_FILE}")
            if int(info["dim"]) != int(dim):
                raise ModelMismatchError(
                    f"{self.url} holds d={info['dim']} descriptors, this model gives d={dim}"
                )
            return info
        info = {
            "model_id": self.model_id,
            "dim": int(dim),
            "kind": kind,
            "model": model,
            "status": "building",
            "created": _now(),
        }
        st.write_json_atomic(self.sub(VERSION_FILE), info, self.storage)
        return info

    def mark(self, status: str, **extra: Any) -> dict[str, Any]:
        info = self.info()
        if info is None:
            raise HistoryError(f"{self.url} has no {VERSION_FILE}")
        info.update(extra, status=status, updated=_now())
        st.write_json_atomic(self.sub(VERSION_FILE), info, self.storage)
        return info

    def state(self) -> State:
        url = self.sub(STATE_FILE)
        if not st.exists(url, self.storage):
            return State(model_id=self.model_id)
        state = State.from_dict(st.read_json(url, self.storage))
        check_model(state.model_id, self.model_id, f"{url}")
        return state

    def save_state(self, state: State) -> None:
        """The commit point of a run: one atomic JSON write."""
        check_model(state.model_id, self.model_id, "the ledger being saved")
        state.updated = _now()
        st.write_json_atomic(self.sub(STATE_FILE), state.to_dict(), self.storage)


@dataclass
class RunRecord:
    """One applied run in the ledger. Dense row ids first_id .. first_id + count - 1 are the
    images it admitted; they index the vector and index parts. input is the URL it read, so a
    backfill can replay the run with another model."""

    run_id: str
    kind: str
    date: str
    first_id: int
    count: int
    input: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class State:
    """The ledger of a version. `pending` names the run in progress: no other run may start
    until it commits, since it has already claimed the next block of row ids."""

    model_id: str
    runs: list[RunRecord] = field(default_factory=list)
    pending: dict[str, Any] | None = None
    index: dict[str, Any] = field(default_factory=dict)
    updated: str = ""
    format: str = STATE_FORMAT

    @property
    def total(self) -> int:
        """Images in the history (the next free row id)."""
        return sum(run.count for run in self.runs)

    def run(self, run_id: str) -> RunRecord | None:
        return next((run for run in self.runs if run.run_id == run_id), None)

    def claim(self, run_id: str, kind: str, date: str) -> dict[str, Any]:
        """Reserve the next id block for run_id, or resume the claim it already holds."""
        if self.pending is not None and self.pending["run_id"] != run_id:
            raise HistoryError(
                f"run {self.pending['run_id']} did not finish; re-run it first (it resumes "
                "where it stopped), then run this one"
            )
        if self.pending is None:
            self.pending = {
                "run_id": run_id,
                "kind": kind,
                "date": date,
                "first_id": self.total,
                "started": _now(),
            }
        return self.pending

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> State:
        if data.get("format") != STATE_FORMAT:
            raise HistoryError(f"state format {data.get('format')!r} is not {STATE_FORMAT}")
        return cls(
            model_id=data["model_id"],
            runs=[RunRecord(**run) for run in data.get("runs", [])],
            pending=data.get("pending"),
            index=dict(data.get("index") or {}),
            updated=data.get("updated", ""),
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
