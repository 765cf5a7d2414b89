"""Arrow schemas of every table rdcd writes, and conversions between tables and arrays.

These are the data contracts between stages and with analytics tools (DuckDB, Spark, Trino).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ERRORS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("image_id", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        ("image_id_a", pa.string()),
        ("image_id_b", pa.string()),
        ("score", pa.float32()),
        ("exact", pa.bool_()),
        ("run_id", pa.string()),
        ("model_id", pa.string()),
    ]
)

GROUPS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("group_id", pa.string()),
        ("group_size", pa.int32()),
        ("is_keeper", pa.bool_()),
        ("keep_reason", pa.string()),
    ]
)

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("reference_id", pa.string()),
        ("score", pa.float32()),
    ]
)


def ordered_pairs(
    ia: pa.Array,
    ib: pa.Array,
    score: np.ndarray,
    exact: np.ndarray,
    run_id: str,
    model_id: str,
    rows: tuple[np.ndarray, np.ndarray] | None = None,
) -> pa.Table:
    """PAIRS_SCHEMA rows with image_id_a < image_id_b, sorted by (a, b). With rows, the two
    dense row ids travel along as row_a / row_b, swapped with their image ids."""
    swap = pc.greater(ia, ib)
    n = len(ia)
    columns = {
        "image_id_a": pc.if_else(swap, ib, ia),
        "image_id_b": pc.if_else(swap, ia, ib),
        "score": pa.array(score, pa.float32()),
        "exact": pa.array(exact, pa.bool_()),
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
        "model_id": pa.repeat(pa.scalar(model_id, pa.string()), n),
    }
    schema = PAIRS_SCHEMA
    if rows is not None:
        a, b = pa.array(rows[0], pa.int64()), pa.array(rows[1], pa.int64())
        columns["row_a"] = pc.if_else(swap, b, a)
        columns["row_b"] = pc.if_else(swap, a, b)
        schema = schema.append(pa.field("row_a", pa.int64())).append(pa.field("row_b", pa.int64()))
    table = pa.table(columns, schema=schema)
    return table.sort_by([("image_id_a", "ascending"), ("image_id_b", "ascending")])


def descriptors_schema(dim: int) -> pa.Schema:
    """Schema of descriptors/ for d-dimensional float16 descriptors."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("content_hash", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("descriptor", pa.list_(pa.float16(), dim)),
            ("model_id", pa.string()),
        ]
    )


def descriptor_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) floats -> fixed_size_list<float16>[d] without a per-row Python loop."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    n, dim = vectors.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float16()), dim)


def descriptor_matrix(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """fixed_size_list<float16>[d] column -> (n, d) array, zero-copy per chunk where possible."""
    if isinstance(column, pa.ChunkedArray):
        chunks = [descriptor_matrix(chunk, dtype) for chunk in column.chunks]
        if not chunks:
            return np.zeros((0, column.type.list_size), dtype=dtype)
        return np.concatenate(chunks)
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(dtype, copy=False)


def descriptor_dim(schema: pa.Schema) -> int:
    """d of a descriptors table; a clear error when the column is missing or not fixed-size."""
    if "descriptor" not in schema.names:
        raise ValueError("table has no 'descriptor' column")
    field_type = schema.field("descriptor").type
    if not pa.types.is_fixed_size_list(field_type):
        raise ValueError(f"'descriptor' must be fixed_size_list<float16>[d], got {field_type}")
    return field_type.list_size
