"""The prediction record: the fields every path returns for an image, their types as one Arrow schema, and the
writers of rows that use it.

`Predictor.records` fills records, the service returns them as JSON, and `classify` and `evaluate` write them as
rows (Parquet, CSV, JSON lines). Every file is written with the schema declared here: left to inference from
its rows, a file whose images all decoded typed `error` as Arrow `null` and a later one with a broken image as
`string`, and a folder of such files no longer read as one table (pandas, pyarrow datasets, DuckDB). Importing
this module is cheap: no TensorFlow, no Ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import BinaryIO, NamedTuple

import pyarrow
import pyarrow.csv
import pyarrow.parquet

OUT_OF_DISTRIBUTION = "out_of_distribution"


def record_schema(class_names: Sequence[str], before: Sequence[str] = (), after: Sequence[str] = ()) -> pyarrow.Schema:
    """The record's fields as Arrow types, for a bundle's `class_names` (`probabilities` is a struct with one
    field per class, so it reads back as a dict), with the text columns `before` and `after` it (a row's
    `path`, say)."""
    record = [
        ("label", pyarrow.string()),
        ("cancer_probability", pyarrow.float64()),
        ("probabilities", pyarrow.struct([(name, pyarrow.float64()) for name in class_names])),
        ("threshold", pyarrow.float64()),
        ("in_distribution", pyarrow.bool_()),
        ("ood_score", pyarrow.float64()),
        ("uncertain", pyarrow.bool_()),
        ("member_probabilities", pyarrow.list_(pyarrow.float64())),
        ("error", pyarrow.string()),
        ("error_reason", pyarrow.string()),
        ("model_version", pyarrow.string()),
    ]
    text = lambda names: [(name, pyarrow.string()) for name in names]  # noqa: E731
    return pyarrow.schema([*text(before), *record, *text(after)])


RECORD_FIELDS = tuple(record_schema(class_names=()).names)


def error_record(error: str, threshold: float, model_version: str) -> dict:
    """The record of an image that could not be read: `error` ("reason: detail") and no prediction."""
    return {
        **dict.fromkeys(RECORD_FIELDS), "threshold": threshold, "model_version": model_version,
        "error": error, "error_reason": error.split(":", 1)[0],
    }


def text_schema(schema: pyarrow.Schema) -> pyarrow.Schema:
    """`schema` with its nested columns (a struct, a list) as JSON text: what a CSV file holds."""
    return pyarrow.schema(
        [field.with_type(pyarrow.string()) if pyarrow.types.is_nested(field.type) else field for field in schema]
    )


def _write_csv(table: pyarrow.Table, stream: BinaryIO) -> None:
    columns = [
        pyarrow.array([None if value is None else json.dumps(value) for value in column.to_pylist()], pyarrow.string())
        if pyarrow.types.is_nested(column.type) else column
        for column in table.columns
    ]
    pyarrow.csv.write_csv(pyarrow.Table.from_arrays(columns, schema=text_schema(table.schema)), stream)


def _write_jsonl(table: pyarrow.Table, stream: BinaryIO) -> None:
    stream.write("".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode())


class RowFormat(NamedTuple):
    suffix: str
    write: Callable[[pyarrow.Table, BinaryIO], None]  # one table to a binary stream


WRITERS: dict[str, RowFormat] = {
    "parquet": RowFormat(".parquet", pyarrow.parquet.write_table),
    "csv": RowFormat(".csv", _write_csv),
    "jsonl": RowFormat(".json", _write_jsonl),
}
