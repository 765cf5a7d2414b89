"""Filesystems for any URL (local, file://, s3://, ...) and atomic publication of outputs.

A stage output is complete only once its manifest.json exists: outputs are first written
under a temporary name, then moved into place, and the manifest is written last.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs as pafs

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StorageOptions:
    """Object-storage settings; None falls back to the standard AWS_* variables."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, storage: dict[str, Any] | None) -> StorageOptions:
        storage = storage or {}
        return cls(
            endpoint_url=storage.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL"),
            key=storage.get("key") or os.environ.get("AWS_ACCESS_KEY_ID"),
            secret=storage.get("secret") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region=storage.get("region") or os.environ.get("AWS_REGION"),
        )


def protocol_of(url: str) -> str:
    """'s3' for s3://..., 'file' for local paths and file://..."""
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"


def strip_protocol(url: str) -> str:
    """The path part a filesystem object expects (no scheme)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if "://" in url:
        return url.split("://", 1)[1]
    return os.path.abspath(url)


def get_filesystem(url: str, options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for url; S3 endpoints and keys come from options or AWS_*."""
    options = options or StorageOptions.from_config(None)
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a"):
        kwargs: dict[str, Any] = {}
        client_kwargs: dict[str, Any] = {}
        if options.endpoint_url:
            client_kwargs["endpoint_url"] = options.endpoint_url
        if options.region:
            client_kwargs["region_name"] = options.region
        if options.key:
            kwargs["key"] = options.key
            kwargs["secret"] = options.secret
        return fsspec.filesystem("s3", client_kwargs=client_kwargs, **kwargs)
    return fsspec.filesystem(protocol)


def get_pyarrow_filesystem(url: str, options: StorageOptions | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem for url (Ray Data and pyarrow.parquet want these)."""
    if protocol_of(url) == "file":
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(get_filesystem(url, options)))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path."""
    if protocol_of(url) == "file" and not url.startswith("file://"):
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def exists(url: str, options: StorageOptions | None = None) -> bool:
    return get_filesystem(url, options).exists(strip_protocol(url))


def write_bytes_atomic(url: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write data so that readers see either nothing or the whole file."""
    fs = get_filesystem(url, options)
    path = strip_protocol(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/_tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    fs.mv(tmp, path)


def publish_directory(tmp_url: str, final_url: str, options: StorageOptions | None = None) -> None:
    """Move a fully written temporary directory into its final place.

    Local filesystems rename in one step; object stores copy file by file, which is why
    readers must trust a directory only once its manifest says it is complete.
    """
    fs = get_filesystem(final_url, options)
    tmp, final = strip_protocol(tmp_url), strip_protocol(final_url)
    if fs.exists(final):
        fs.rm(final, recursive=True)
    if protocol_of(final_url) == "file":
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(tmp, final)
        return
    for source in fs.find(tmp):
        fs.copy(source, final + source[len(tmp) :])
    fs.rm(tmp, recursive=True)
    fs.invalidate_cache()


def read_bytes(url: str, options: StorageOptions | None = None) -> bytes:
    """The whole object at url (small files: cards, manifests, logs)."""
    with get_filesystem(url, options).open(strip_protocol(url), "rb") as handle:
        return handle.read()


def read_json(url: str, options: StorageOptions | None = None) -> dict[str, Any]:
    return json.loads(read_bytes(url, options))


def write_json_atomic(url: str, payload: dict[str, Any], options: StorageOptions | None = None):
    write_bytes_atomic(
        url, json.dumps(payload, indent=2, sort_keys=True, default=str).encode(), options
    )


def read_manifest(directory: str, options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The manifest of a stage output, or None when the stage never completed."""
    url = join(directory, MANIFEST)
    if not exists(url, options):
        return None
    return read_json(url, options)


def is_complete(directory: str, options: StorageOptions | None = None) -> bool:
    manifest = read_manifest(directory, options)
    return manifest is not None and manifest.get("status") == "complete"


def write_manifest(
    directory: str, payload: dict[str, Any], options: StorageOptions | None = None
) -> dict[str, Any]:
    """Write manifest.json last; status 'complete' marks the output as finished."""
    payload = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    write_json_atomic(join(directory, MANIFEST), payload, options)
    return payload
