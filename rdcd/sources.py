"""Inputs as streams of (image_id, uri, bytes): image folders, WebDataset tars, Parquet.

Every job that reads images (embedding, training) lists its input here and reads it shard by
shard, so a re-run can tell which shards it already finished. A shard is a fixed group of files
of a folder (by sorted listing), one ``.tar``, or one ``.parquet`` file. Bytes are only ever read
inside shard readers (Ray tasks), never on the driver.

Ids, chosen to be stable across runs and unique within an input:
- folders: the path relative to the input root (``cats/0001.jpg``);
- WebDataset tars: the sample key (img2dataset keys are unique across shards); with
  ``tar_id: shard_key`` the key is prefixed by the tar's relative path without ``.tar``, for
  sets whose keys repeat from shard to shard;
- Parquet: the value of the id column.
A key that repeats inside one shard becomes an error row ``<id>#dup<n>`` (stage
``duplicate_id``), so no input is dropped and no id appears twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rdcd.storage import StorageOptions, get_filesystem, protocol_of, strip_protocol

LAYOUTS = ("files", "tar", "parquet")
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
ID_COLUMNS = ("image_id", "id", "key", "path", "uri")
"""Columns an --ids manifest may use, in order of preference (else its first column)."""

READ_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("bytes", pa.binary()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)
"""Rows of a shard: when an input could not be read, ``bytes`` is null, ``stage`` is "read" (or
"duplicate_id") and ``error`` says why."""

END_FIELD = pa.field("shard_end", pa.int64())
"""With end markers, each shard ends with one row (image_id null) whose shard_end holds the
number of inputs the shard produced: downstream stages learn when a shard is complete."""

_TAR_BLOCK_SIZE = 8 << 20


class SourceError(ValueError):
    """An input that cannot be listed or read as a whole (missing, empty, wrong layout)."""


@dataclass(frozen=True)
class SourceOptions:
    """How to interpret an input URL (configs/local.yaml ``input:``)."""

    layout: str = "auto"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    files_per_shard: int = 1000
    tar_id: str = "key"
    parquet_id_column: str = "key"
    parquet_bytes_column: str = "jpg"
    block_rows: int = 64
    fetch_concurrency: int = 16

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *LAYOUTS):
            raise SourceError(f"input.layout must be auto or one of {LAYOUTS}, got {self.layout!r}")
        if self.tar_id not in ("key", "shard_key"):
            raise SourceError(f"input.tar_id must be 'key' or 'shard_key', got {self.tar_id!r}")
        if self.files_per_shard < 1 or self.block_rows < 1 or self.fetch_concurrency < 1:
            raise SourceError(
                "input.files_per_shard, block_rows and fetch_concurrency must be >= 1"
            )
        normalised = tuple(ext.lower().lstrip(".") for ext in self.extensions)
        if not normalised:
            raise SourceError("input.extensions is empty")
        object.__setattr__(self, "extensions", normalised)

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> SourceOptions:
        section = dict(section or {})
        if "extensions" in section:
            section["extensions"] = tuple(section["extensions"] or ())
        return cls(**section)


@dataclass(frozen=True)
class InputShard:
    """One unit of reading and of resumable output."""

    name: str
    layout: str
    root: str
    paths: tuple[str, ...]
    size_bytes: int
    count: int | None = None
    """Inputs in the shard when the listing knows it (folders), else None until read."""


@dataclass(frozen=True)
class Listing:
    """What an input URL holds, in a stable order; ``digest`` changes when any object does."""

    url: str
    root: str
    layout: str
    shards: tuple[InputShard, ...]
    objects: tuple[tuple[str, int], ...] = field(repr=False)
    digest: str = ""

    @property
    def count(self) -> int | None:
        """Inputs listed, when every shard knows its count (folders); else None."""
        counts = [shard.count for shard in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    def describe(self, max_objects: int = 1000) -> dict[str, Any]:
        """The listing as recorded in a manifest: always counts and digest, names if few."""
        described: dict[str, Any] = {
            "url": self.url,
            "layout": self.layout,
            "objects": len(self.objects),
            "shards": len(self.shards),
            "digest": self.digest,
        }
        if self.count is not None:
            described["inputs"] = self.count
        if len(self.objects) <= max_objects:
            described["files"] = [name for name, _ in self.objects]
        return described


def list_inputs(
    url: str,
    options: SourceOptions | None = None,
    storage: StorageOptions | None = None,
    ids: frozenset[str] | None = None,
) -> Listing:
    """List url (a folder/prefix, or one image, .tar or .parquet file) into shards.

    With ``ids``, a folder's listing keeps only files whose id (relative path) or URL is in
    ids; tars and Parquet files are filtered while they are read.
    """
    options = options or SourceOptions()
    fs = get_filesystem(url, storage)
    path = strip_protocol(url).rstrip("/") or "/"
    try:
        if not fs.exists(path):
            bucket = path.split("/", 1)[0]
            if protocol_of(url) != "file" and not fs.exists(bucket):
                raise SourceError(f"input not found: bucket {bucket!r} does not exist ({url})")
            raise SourceError(f"input not found: {url}")
        if fs.isfile(path):
            root = posixpath.dirname(path)
            entries = {path: fs.info(path)}
        else:
            root = path
            entries = fs.find(path, withdirs=False, detail=True)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage clients raise their own types (botocore)
        raise SourceError(f"cannot list input {url}: {type(exc).__name__}: {exc}") from exc
    protocol = protocol_of(url)
    objects = sorted(
        (_relative(root, name), int(info.get("size") or 0))
        for name, info in entries.items()
        if info.get("type", "file") == "file" or (info.get("islink") and fs.isfile(name))
    )
    objects = [(rel, size) for rel, size in objects if not _hidden(rel)]
    layout, chosen = _choose_layout(url, objects, options)
    root_url = _to_url(protocol, root)
    if layout == "files":
        if ids is not None:
            chosen = [
                (rel, size) for rel, size in chosen if rel in ids or _join(root_url, rel) in ids
            ]
        shards = _file_shards(root_url, chosen, options.files_per_shard)
    else:
        shards = tuple(
            InputShard(
                name=f"{index:06d}",
                layout=layout,
                root=root_url,
                paths=(_join(root_url, rel),),
                size_bytes=size,
            )
            for index, (rel, size) in enumerate(chosen)
        )
    if layout == "parquet":
        _check_parquet_columns(shards[0], options, storage)
    digest = hashlib.sha256()
    digest.update(f"{layout}\n".encode())
    for rel, size in chosen:
        digest.update(f"{rel}\t{size}\n".encode())
    return Listing(
        url=url,
        root=root_url,
        layout=layout,
        shards=shards,
        objects=tuple(chosen),
        digest=digest.hexdigest(),
    )


def read_shard(
    shard: InputShard,
    options: SourceOptions | None = None,
    storage: StorageOptions | None = None,
    ids: frozenset[str] | None = None,
    end_marker: bool = False,
) -> Iterator[pa.Table]:
    """Yield the shard's rows (READ_SCHEMA) in tables of at most options.block_rows rows.

    Unreadable inputs become rows with an ``error`` instead of exceptions, so one bad object
    never stops a job. With end_marker, a last one-row table carries ``shard_end``.
    """
    options = options or SourceOptions()
    readers = {"files": _read_files, "tar": _read_tar, "parquet": _read_parquet}
    rows = _dedupe(readers[shard.layout](shard, options, storage, ids), shard)
    count = 0
    for batch in _batched(rows, options.block_rows):
        count += len(batch)
        table = pa.Table.from_pylist(batch, schema=READ_SCHEMA)
        if end_marker:
            table = table.append_column(END_FIELD, pa.nulls(len(batch), pa.int64()))
        yield table
    if end_marker:
        marker = {
            "shard": shard.name,
            "image_id": None,
            "uri": shard.paths[0] if shard.paths else "",
        }
        table = pa.Table.from_pylist([marker], schema=READ_SCHEMA)
        yield table.append_column(END_FIELD, pa.array([count], pa.int64()))


def read_schema(end_markers: bool = False) -> pa.Schema:
    return READ_SCHEMA.append(END_FIELD) if end_markers else READ_SCHEMA


def read_images(
    source: str | Listing,
    options: SourceOptions | None = None,
    storage: StorageOptions | None = None,
    *,
    ids: frozenset[str] | None = None,
    shards: Iterable[InputShard] | None = None,
    end_markers: bool = False,
    num_cpus: float = 1.0,
):
    """A Ray Data dataset of READ_SCHEMA rows, one read task per shard.

    ``shards`` restricts reading to a subset of the listing (e.g. the unfinished ones).
    """
    import ray.data

    options = options or SourceOptions()
    listing = source if isinstance(source, Listing) else list_inputs(source, options, storage, ids)
    selected = tuple(listing.shards if shards is None else shards)
    if not selected:
        return ray.data.from_arrow(read_schema(end_markers).empty_table())
    ids_ref = None
    if ids is not None and listing.layout != "files":
        ids_ref = ray.put(ids)
    datasource = ShardDatasource(selected, options, storage, ids_ref, end_markers)
    return ray.data.read_datasource(
        datasource, override_num_blocks=len(selected), num_cpus=num_cpus
    )


def load_ids(url: str, storage: StorageOptions | None = None) -> frozenset[str]:
    """Ids (or paths/URLs) from a .parquet, .csv (with a header) or .txt (one per line) file."""
    fs = get_filesystem(url, storage)
    path = strip_protocol(url)
    if not fs.exists(path):
        raise SourceError(f"--ids file not found: {url}")
    with fs.open(path, "rb") as handle:
        data = handle.read()
    suffix = posixpath.splitext(path)[1].lower()
    if suffix == ".parquet":
        table = pq.read_table(io.BytesIO(data))
        column = next((c for c in ID_COLUMNS if c in table.column_names), table.column_names[0])
        values = [str(v) for v in table.column(column).to_pylist() if v is not None]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        names = reader.fieldnames or []
        if not names:
            raise SourceError(f"--ids file {url} has no header row")
        column = next((c for c in ID_COLUMNS if c in names), names[0])
        values = [row[column] for row in reader if row.get(column)]
    elif suffix == ".txt":
        values = [line.strip() for line in data.decode("utf-8-sig").splitlines()]
    else:
        raise SourceError(f"--ids file {url} must be .parquet, .csv or .txt")
    ids = frozenset(v for v in values if v)
    if not ids:
        raise SourceError(f"--ids file {url} lists no ids")
    return ids


def ids_digest(ids: frozenset[str] | None) -> str | None:
    """A short fingerprint of an id set, recorded so a resume cannot mix two subsets."""
    if ids is None:
        return None
    digest = hashlib.sha256()
    for value in sorted(ids):
        digest.update(value.encode() + b"\n")
    return digest.hexdigest()


def _read_files(
    shard: InputShard, options: SourceOptions, storage: StorageOptions | None, ids
) -> Iterator[dict[str, Any]]:
    fs = get_filesystem(shard.root, storage)
    step = options.fetch_concurrency
    for start in range(0, len(shard.paths), step):
        urls = shard.paths[start : start + step]
        paths = [strip_protocol(u) for u in urls]
        # fsspec fetches a list concurrently on object stores; errors come back per path.
        fetched = fs.cat(paths, on_error="return") if len(paths) > 1 else _cat_one(fs, paths[0])
        for url, path in zip(urls, paths, strict=True):
            data = fetched.get(path)
            row = {"shard": shard.name, "image_id": _relative_url(shard.root, url), "uri": url}
            if isinstance(data, bytes | bytearray):
                row["bytes"] = bytes(data)
            else:
                reason = data if data is not None else "object missing"
                row["stage"] = "read"
                row["error"] = f"cannot read object: {type(reason).__name__}: {reason}"
            yield row


def _cat_one(fs, path: str) -> dict[str, Any]:
    try:
        return {path: fs.cat_file(path)}
    except (OSError, ValueError) as exc:
        return {path: exc}


def _read_tar(
    shard: InputShard, options: SourceOptions, storage: StorageOptions | None, ids
) -> Iterator[dict[str, Any]]:
    """Stream a WebDataset tar: consecutive members sharing a key form one sample."""
    url = shard.paths[0]
    relative = _relative_url(shard.root, url)
    prefix = relative[: -len(".tar")] + "/" if relative.endswith(".tar") else relative + "/"
    rank = {ext: i for i, ext in enumerate(options.extensions)}
    wanted = _resolve_ids(ids)
    fs = get_filesystem(url, storage)
    key: str | None = None
    members: dict[str, tuple[str, bytes]] = {}

    def sample() -> dict[str, Any] | None:
        if key is None or not members:
            return None
        ext = min(members, key=rank.__getitem__)
        name, data = members[ext]
        image_id = prefix + key if options.tar_id == "shard_key" else key
        if wanted is not None and image_id not in wanted and key not in wanted:
            return None
        return {
            "shard": shard.name,
            "image_id": image_id,
            "uri": f"tar://{name}::{url}",
            "bytes": data,
        }

    read = 0
    try:
        with (
            fs.open(strip_protocol(url), "rb", block_size=_TAR_BLOCK_SIZE) as handle,
            tarfile.open(fileobj=handle, mode="r|*") as archive,
        ):
            for member in archive:
                if not member.isfile():
                    continue
                directory, base = posixpath.split(member.name)
                stem, _, ext = base.partition(".")
                member_key = posixpath.join(directory, stem)
                if member_key != key:
                    row = sample()
                    if row is not None:
                        yield row
                    key, members = member_key, {}
                ext = ext.lower()
                if ext in rank and ext not in members:
                    extracted = archive.extractfile(member)
                    members[ext] = (member.name, extracted.read() if extracted else b"")
                read += 1
        row = sample()
        if row is not None:
            yield row
    except (OSError, tarfile.TarError, EOFError) as exc:
        yield {
            "shard": shard.name,
            "image_id": relative,
            "uri": url,
            "stage": "read",
            "error": f"unreadable tar after {read} members: {type(exc).__name__}: {exc}",
        }


def _read_parquet(
    shard: InputShard, options: SourceOptions, storage: StorageOptions | None, ids
) -> Iterator[dict[str, Any]]:
    url = shard.paths[0]
    relative = _relative_url(shard.root, url)
    id_col, bytes_col = options.parquet_id_column, options.parquet_bytes_column
    wanted = _resolve_ids(ids)
    fs = get_filesystem(url, storage)
    row_index = 0
    try:
        with fs.open(strip_protocol(url), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            missing = {id_col, bytes_col} - set(parquet.schema_arrow.names)
            if missing:
                raise SourceError(f"no column(s) {sorted(missing)} (input.parquet_*_column)")
            for batch in parquet.iter_batches(
                batch_size=options.block_rows, columns=[id_col, bytes_col]
            ):
                for image_id, data in zip(
                    batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
                ):
                    uri = f"{url}#row={row_index}"
                    row_index += 1
                    if image_id is None:
                        yield {
                            "shard": shard.name,
                            "image_id": f"{relative}#row={row_index - 1}",
                            "uri": uri,
                            "stage": "read",
                            "error": f"null {id_col!r}",
                        }
                        continue
                    image_id = str(image_id)
                    if wanted is not None and image_id not in wanted:
                        continue
                    row = {"shard": shard.name, "image_id": image_id, "uri": uri}
                    if data is None:
                        row["stage"] = "read"
                        row["error"] = f"null {bytes_col!r} (no image bytes)"
                    else:
                        row["bytes"] = data
                    yield row
    except (OSError, ValueError, pa.ArrowException) as exc:
        yield {
            "shard": shard.name,
            "image_id": relative,
            "uri": url,
            "stage": "read",
            "error": f"unreadable parquet after {row_index} rows: {type(exc).__name__}: {exc}",
        }


def _dedupe(rows: Iterable[dict[str, Any]], shard: InputShard) -> Iterator[dict[str, Any]]:
    """Keep ids unique: a repeat inside a shard becomes an error row with a suffixed id."""
    seen: dict[str, int] = {}
    for row in rows:
        image_id = row["image_id"]
        repeats = seen.get(image_id, 0)
        seen[image_id] = repeats + 1
        if repeats:
            yield {
                "shard": shard.name,
                "image_id": f"{image_id}#dup{repeats}",
                "uri": row["uri"],
                "stage": "duplicate_id",
                "error": f"id {image_id!r} occurs again in {shard.paths[0]}; not embedded twice",
            }
        else:
            yield row


def _batched(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _resolve_ids(ids) -> frozenset[str] | None:
    """ids arrive as a frozenset, or as an ObjectRef so big sets ship once per worker."""
    if ids is None or isinstance(ids, frozenset):
        return ids
    import ray

    return ray.get(ids)


def _choose_layout(
    url: str, objects: list[tuple[str, int]], options: SourceOptions
) -> tuple[str, list[tuple[str, int]]]:
    by_layout = {
        "tar": [o for o in objects if o[0].lower().endswith(".tar")],
        "parquet": [o for o in objects if o[0].lower().endswith(".parquet")],
        "files": [o for o in objects if _extension(o[0]) in options.extensions],
    }
    if options.layout != "auto":
        if not by_layout[options.layout]:
            raise SourceError(f"no {_describe_layout(options)} found under {url}")
        return options.layout, by_layout[options.layout]
    for layout in ("tar", "parquet", "files"):
        if by_layout[layout]:
            return layout, by_layout[layout]
    raise SourceError(
        f"nothing to read under {url}: no .tar, no .parquet and no image files "
        f"(extensions: {', '.join(options.extensions)})"
    )


def _describe_layout(options: SourceOptions) -> str:
    if options.layout == "files":
        return f"image files (extensions: {', '.join(options.extensions)})"
    return f".{options.layout} files"


def _file_shards(
    root_url: str, objects: list[tuple[str, int]], per_shard: int
) -> tuple[InputShard, ...]:
    shards = []
    for index, start in enumerate(range(0, len(objects), per_shard)):
        chunk = objects[start : start + per_shard]
        shards.append(
            InputShard(
                name=f"{index:06d}",
                layout="files",
                root=root_url,
                paths=tuple(_join(root_url, rel) for rel, _ in chunk),
                size_bytes=sum(size for _, size in chunk),
                count=len(chunk),
            )
        )
    return tuple(shards)


def _check_parquet_columns(
    shard: InputShard, options: SourceOptions, storage: StorageOptions | None
) -> None:
    """Fail before any work when the first file lacks the configured columns."""
    url = shard.paths[0]
    fs = get_filesystem(url, storage)
    try:
        with fs.open(strip_protocol(url), "rb") as handle:
            names = pq.ParquetFile(handle).schema_arrow.names
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read Parquet input {url}: {exc}") from exc
    for setting, column in (
        ("input.parquet_id_column", options.parquet_id_column),
        ("input.parquet_bytes_column", options.parquet_bytes_column),
    ):
        if column not in names:
            raise SourceError(
                f"{url} has no column {column!r} ({setting}); its columns: {', '.join(names)}"
            )


def _extension(name: str) -> str:
    return posixpath.splitext(name)[1].lower().lstrip(".")


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _relative(root: str, path: str) -> str:
    root = root.rstrip("/")
    if path == root:
        return posixpath.basename(path)
    return path[len(root) :].lstrip("/")


def _to_url(protocol: str, path: str) -> str:
    return path if protocol == "file" else f"{protocol}://{path}"


def _join(root_url: str, relative: str) -> str:
    return f"{root_url.rstrip('/')}/{relative}"


def _relative_url(root_url: str, url: str) -> str:
    return url[len(root_url.rstrip("/")) :].lstrip("/")


class ShardDatasource(Datasource):
    """One Ray Data read task per shard; each streams its shard in small blocks."""

    def __init__(
        self,
        shards: tuple[InputShard, ...],
        options: SourceOptions,
        storage: StorageOptions | None,
        ids: Any,
        end_markers: bool,
    ) -> None:
        super().__init__()
        self._shards = shards
        self._options = options
        self._storage = storage
        self._ids = ids
        self._end_markers = end_markers

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(shard.size_bytes for shard in self._shards) or None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        schema = read_schema(self._end_markers)
        return [
            ReadTask(
                self._reader(shard),
                BlockMetadata(
                    num_rows=None,
                    size_bytes=shard.size_bytes,
                    exec_stats=None,
                    input_files=shard.paths,
                ),
                schema=schema,
            )
            for shard in self._shards
        ]

    def _reader(self, shard: InputShard):
        options, storage, ids, end_markers = (
            self._options,
            self._storage,
            self._ids,
            self._end_markers,
        )
        return lambda: read_shard(shard, options, storage, ids, end_markers)

    def get_name(self) -> str:
        return "ReadShards"
