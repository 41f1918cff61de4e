"""Rows and cells of the table files benchmarks ship in (TSV, parquet), and the images
stored inside them.

An image embedded in a benchmark file is not kept in memory: a record holds a reference
``tsv:<byte offset>:<column>:<path>`` or ``parquet:<row>:<column>:<path>``, and
``read_embedded`` reads that one cell back when the image is used.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from .records import kind_of


def _allow_huge_fields() -> None:
    # One base64 image is one field of several MB; csv's default cap is 128 KiB.
    if csv.field_size_limit() < 2**31 - 1:
        csv.field_size_limit(2**31 - 1)


class Lines:
    """Text lines of a binary file, counting where the next one starts. ``csv`` pulls no
    line beyond the record it returns, so the count marks the start of the next record."""

    def __init__(self, f):
        self.f, self.offset, self.lineno = f, f.tell(), 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.f.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        self.lineno += 1
        return line.decode("utf-8", errors="surrogateescape")


def _tsv(lines) -> Iterator[list[str]]:
    """TSV without quote processing: the published files quote nothing, and a cell that opens a
    quote must not swallow the rows after it."""
    return csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)


def tsv_header(path: Path) -> list[str] | None:
    """The first row's cells (None for an empty file), read without the rest of the file."""
    _allow_huge_fields()
    with open(path, "rb") as f:
        header = next(_tsv(Lines(f)), None)
    if header:
        header[0] = header[0].lstrip("\ufeff")  # a byte-order mark is not part of the first name
    return header


def tsv_rows(path: Path) -> Iterator[tuple[int, int, list[str] | None, list[str] | str]]:
    """(byte offset, line, header, row) for each data row; a row that does not parse is a str reason."""
    _allow_huge_fields()
    with open(path, "rb") as f:
        lines = Lines(f)
        reader = _tsv(lines)
        header = next(reader, None)
        if header:
            header[0] = header[0].lstrip("\ufeff")  # a byte-order mark is not part of the first name
        while True:
            start, line = lines.offset, lines.lineno + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, line, header, f"not a TSV row ({e})"
                continue
            yield start, line, header, row


def tsv_cell(path: Path, offset: int, column: int) -> str:
    _allow_huge_fields()
    with open(path, "rb") as f:
        f.seek(offset)
        return next(_tsv(Lines(f)))[column]


def parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Each row as a dict, one batch at a time (pyarrow reads one row group's columns)."""
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=16):
        for rec in batch.to_pylist():
            yield row, rec
            row += 1


def parquet_cell(path: Path, row: int, column: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        if row < n:
            return pf.read_row_group(group, columns=[column]).column(0)[row].as_py()
        row -= n
    raise IndexError(f"row beyond the end of {path}")


def read_embedded(ref: str) -> str | bytes:
    """The stored image of a ``tsv:`` or ``parquet:`` reference: base64 text or raw bytes."""
    kind, place, column, path = ref.split(":", 3)
    if kind == "tsv":
        return tsv_cell(Path(path), int(place), int(column))
    value = parquet_cell(Path(path), int(place), column)
    return image_value(value)


def image_value(value) -> str | bytes:
    """An image column's value: base64 text, raw bytes, or ``datasets``' {"bytes": ...} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (str, bytes)):
        raise ValueError(f"image must be base64 text or bytes, got {kind_of(value)}")
    return value
