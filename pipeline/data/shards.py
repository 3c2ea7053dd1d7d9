"""The prepared Parquet shards, read row group by row group, so a corrupt shard is named, never a bare pyarrow error.

Labeled and validation shards must be whole (`read_rows` raises an InputError naming the shard). The
unlabeled pool may lose parts: unreadable row groups and undecodable images are skipped and counted in
`Skipped`, which ends in metrics.json as `corrupt_rows_skipped` and `corrupt_parts_skipped`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.schema import ROW_SCHEMA
from pipeline.errors import InputError

EXAMPLES = 20
READ_ERRORS = (OSError, pa.ArrowException, ValueError)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    rows: int

    @property
    def name(self) -> str:
        return f"{Path(self.path).parent.name}/{Path(self.path).name} row group {self.index}"


@dataclass
class Skipped:
    """Rows of the unlabeled pool that could not be used: distinct parts (row groups, images) and their rows."""

    parts: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, rows: int, why: str) -> None:
        if part not in self.parts:
            log.warning("skipping %s (%d rows) of the unlabeled pool: %s", part, rows, why)
            self.parts[part] = rows

    def metrics(self) -> dict[str, Any]:
        return {"corrupt_rows_skipped": sum(self.parts.values()), "corrupt_parts_skipped": list(self.parts)[:EXAMPLES]}


def shard_files(split_dir: str | Path) -> list[Path]:
    return sorted(Path(split_dir).glob("*.parquet"))


def error_reason(exc: BaseException) -> str:
    """The first line of a read error: pyarrow's messages run over several."""
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def row_groups(split_dir: str | Path) -> tuple[list[RowGroup], dict[str, str]]:
    """Every row group of a split, and the shards whose footer cannot be read (name -> reason).

    A shard that is a Parquet file of another schema is bad input, not damage: InputError naming it.
    """
    groups, unreadable = [], {}
    for path in shard_files(split_dir):
        try:
            with pq.ParquetFile(path) as parquet:
                schema, meta = parquet.schema_arrow, parquet.metadata
        except READ_ERRORS as exc:
            unreadable[f"{path.parent.name}/{path.name}"] = error_reason(exc)
            continue
        missing = [f.name for f in ROW_SCHEMA if schema.get_field_index(f.name) < 0]
        if missing:
            raise InputError(f"{path}: not a shard of `ssod prepare` (no column {', '.join(missing)})")
        # absolute: Ray workers read these paths from another working directory
        groups += [RowGroup(str(path.resolve()), i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return groups, unreadable


def read_group(group: RowGroup, columns: list[str] | None = None) -> pa.Table:
    """One row group; raises READ_ERRORS when it is damaged."""
    with pq.ParquetFile(group.path) as parquet:
        return parquet.read_row_group(group.index, columns=columns)


def whole_tables(split_dir: str | Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The row groups of a split that must be whole (labeled, val); a damaged shard is an InputError naming it."""
    groups, unreadable = row_groups(split_dir)
    if unreadable:
        name, reason = next(iter(unreadable.items()))
        raise InputError(
            f"{Path(split_dir) / Path(name).name}: corrupt Parquet shard ({reason}); run `ssod prepare` again"
        )
    for group in groups:
        yield read_whole_group(group, columns)


def read_whole_group(group: RowGroup, columns: list[str] | None = None) -> pa.Table:
    """One row group of a split that must be whole; damage is an InputError naming the shard."""
    try:
        return read_group(group, columns)
    except READ_ERRORS as exc:
        raise InputError(
            f"{group.path}: corrupt Parquet shard (row group {group.index}: {error_reason(exc)}); "
            "run `ssod prepare` again"
        ) from None


def read_rows(split_dir: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """All rows of a split that must be whole (labeled, val)."""
    return [row for table in whole_tables(split_dir, columns) for row in table.to_pylist()]


def read_pool(groups: list[RowGroup], skipped: Skipped, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the unlabeled pool's row groups; damaged ones are skipped and counted."""
    rows = []
    for group in groups:
        try:
            rows += read_group(group, columns).to_pylist()
        except READ_ERRORS as exc:
            skipped.add(group.name, group.rows, error_reason(exc))
    return rows
