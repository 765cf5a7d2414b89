"""What the index, pairs, groups and report stages share: skip-if-current, Ray task waiting with
a progress bar, clear errors out of remote tasks, file publication to any URL.

A stage output folder is current when its manifest says complete AND records the fingerprint of
exactly the inputs and settings it was built from; anything else is (re)built. So a re-run is a
no-op, a changed threshold redoes only the stages that depend on it, and a half-written stage
resumes from the per-task files it already published.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from tqdm import tqdm

from rdcd import storage as st

FINGERPRINT_FILE = "_fingerprint.json"


def fingerprint(*parts: Any) -> str:
    """A short digest of JSON-able inputs/settings that determine a stage's output."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:24]


def current_manifest(url: str, print_: str, options: st.StorageOptions) -> dict[str, Any] | None:
    """The stage's manifest when it is complete and was built from the same fingerprint."""
    manifest = st.read_manifest(url, options)
    if manifest and manifest.get("status") == "complete" and manifest.get("fingerprint") == print_:
        return manifest
    return None


def reset_if_stale(url: str, print_: str, options: st.StorageOptions) -> None:
    """Start the stage folder afresh unless it holds a partial run with this fingerprint.

    Only a folder rdcd wrote (it has _fingerprint.json) is ever cleared; a non-empty folder
    without one is somebody else's data, and an error.
    """
    fs = st.get_filesystem(url, options)
    path = st.strip_protocol(url)
    plan_url = st.join(url, FINGERPRINT_FILE)
    if fs.exists(path):
        if st.exists(plan_url, options):
            if st.read_json(plan_url, options).get("fingerprint") == print_:
                return
            fs.rm(path, recursive=True)
            fs.invalidate_cache()
        elif fs.ls(path):
            raise ValueError(
                f"{url} already holds files that rdcd did not write; use a new or empty folder"
            )
    fs.makedirs(path, exist_ok=True)
    st.write_json_atomic(plan_url, {"fingerprint": print_}, options)


def wait_for(refs: list, desc: str, unit: str = "task") -> list:
    """Results of Ray refs in submission order, with a progress bar; a task's own ValueError
    / OSError (e.g. a corrupt file it names) is re-raised as itself, not wrapped."""
    results: dict[Any, Any] = {}
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit=unit, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[ref] = get(ref)
                bar.update(1)
    return [results[ref] for ref in refs]


def get(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, (ValueError, OSError)):
            raise cause from None
        raise


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def publish_file(local_path: str, url: str, options: st.StorageOptions) -> None:
    """Move a finished local file to url atomically (a rename locally, one PUT on S3)."""
    if st.protocol_of(url) == "file":
        target = st.strip_protocol(url)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(local_path, target)
        except OSError:  # another filesystem: copy next to the target, then rename
            tmp = f"{target}.part-{os.getpid()}"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, target)
            os.remove(local_path)
        return
    st.get_filesystem(url, options).put(local_path, st.strip_protocol(url))
    os.remove(local_path)


@contextmanager
def scratch_dir(near: str | None = None) -> Iterator[str]:
    """A private local folder for files on their way to outputs: inside the local output
    folder `near` when there is one (publishing is then a rename), else in the temp dir."""
    parent = None
    if near is not None and st.protocol_of(near) == "file":
        parent = st.strip_protocol(near)
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix="_scratch-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def exists_all(urls: list[str], options: st.StorageOptions) -> bool:
    return all(st.exists(url, options) for url in urls)


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config for a manifest, without storage secrets."""
    recorded = json.loads(json.dumps(config, default=str))
    for key in ("key", "secret"):
        if recorded.get("storage", {}).get(key):
            recorded["storage"][key] = "***"
    return recorded
