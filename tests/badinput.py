"""Helpers of the bad-input tests: damaged copies of a prepared set, the errors a refused call or CLI run gives."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError


def copy_prepared(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


def first_shard(split_dir: Path) -> Path:
    return sorted(split_dir.glob("*.parquet"))[0]


def damage_row_group(shard: Path, group: int = 0, column: str = "image") -> None:
    """Flip the first 4 KiB of one column chunk's data page: that row group no longer reads, the others do."""
    chunk = pq.ParquetFile(shard).metadata.row_group(group)
    names = [chunk.column(i).path_in_schema for i in range(chunk.num_columns)]
    meta = chunk.column(names.index(column))
    data = bytearray(shard.read_bytes())
    for offset in range(meta.data_page_offset, meta.data_page_offset + min(4096, meta.total_compressed_size)):
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def error_of(call, *args, **kwargs) -> str:
    """The message of the InputError `call` raises: one line."""
    with pytest.raises(InputError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def assert_one_line(code: int, stderr: str, *names: str) -> None:
    """Exit code 2 and stderr `error: ...` on one line naming every one of `names`, no traceback."""
    assert code == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert all(name in lines[0] for name in names), lines[0]


def assert_one_line_error(done: subprocess.CompletedProcess, *names: str) -> None:
    """`assert_one_line` of a CLI run in its own process."""
    assert_one_line(done.returncode, done.stderr, *names)


def cli_refuses(capsys: pytest.CaptureFixture, argv: list[str], *names: str) -> str:
    """`pipeline.cli.main(argv)` in this process refuses in one line (`assert_one_line`); returns stderr."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert_one_line(code, err, *names)
    return err
