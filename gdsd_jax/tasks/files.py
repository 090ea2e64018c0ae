"""Loading user-supplied data files (JSONL or Parquet) with per-row validation.

A malformed row stops loading with an error naming the file, the row number (1-based; for JSONL the line
number) and the column, and what was expected. Text files must be UTF-8 (a byte-order mark is accepted);
a file that cannot be decoded or parsed at all is a :class:`DataError` naming it too. Nothing is
downloaded: paths are local files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from gdsd_jax.errors import UserError


class DataError(UserError, ValueError):
    """A data file or one of its rows is malformed."""

    def __init__(self, path: str | os.PathLike, row: int | None, column: str | None, message: str):
        self.path, self.row, self.column = str(path), row, column
        where = f"{self.path}"
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


#: A column check: returns an error message, or None if the value is fine.
Check = Callable[[Any], "str | None"]


def is_nonempty_str(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return "expected a non-empty string"
    return None


def is_str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {type(value).__name__}"


def is_nonempty_str_list(value: Any) -> str | None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        # Parquet list columns arrive as lists; anything else is a type error
        return f"expected a non-empty list of strings, got {type(value).__name__}"
    if len(value) == 0:
        return "expected a non-empty list of strings, got an empty list"
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return f"expected a list of strings, item {i} is {type(item).__name__}"
    return None


def is_int_list(value: Any) -> str | None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        return f"expected a non-empty list of integers, got {value!r}"
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            return f"expected a list of integers, item {i} is {item!r}"
    return None


def is_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer, got {value!r}"
    return None


def _decode(path: Path, raw: bytes, row: int | None) -> str:
    """UTF-8 text of ``raw`` (one line, or the whole file when ``row`` is None), without a byte-order mark."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if row is None:
            row = raw[:e.start].count(b"\n") + 1
            e_col = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        else:
            e_col = e.start
        raise DataError(path, row, None, f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e_col + 1}); "
                        f"save the file as UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(path, raw, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow  # lazy: optional (the data extra), only for .parquet files
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, None, None, "reading Parquet needs the 'pyarrow' package (pip install pyarrow), "
                        "or convert the file to JSONL") from None
    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    text = _decode(path, path.read_bytes(), None)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # row numbers count the header as line 1, like a spreadsheet
    for i, row in enumerate(reader, start=2):
        yield i, row


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(row_number, row)`` of a ``.jsonl`` / ``.json`` (one object per line), ``.parquet`` or ``.csv``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "file not found (expected a local JSONL, Parquet or CSV file)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _iter_jsonl(p)
    if suffix in (".parquet", ".pq"):
        return _iter_parquet(p)
    if suffix == ".csv":
        return _iter_csv(p)
    raise DataError(p, None, None, f"unknown file type {suffix!r}; expected .jsonl, .parquet or .csv")


def load_rows(
    path: str | os.PathLike,
    schema: Mapping[str, Check],
    *,
    optional: Mapping[str, Check] | None = None,
    convert: Callable[[dict, int], dict] | None = None,
) -> list[dict]:
    """Load and validate every row of ``path``.

    Args:
      schema: required column -> check. A missing column or a failed check raises :class:`DataError`.
      optional: column -> check applied only when the column is present (and not None).
      convert: ``(row, row_number) -> example`` applied after validation; it may raise ``DataError``.

    Raises:
      DataError: on the first malformed row, and if the file holds no rows at all.
    """
    optional = optional or {}
    out = []
    for rowno, row in iter_rows(path):
        if not isinstance(row, dict):
            raise DataError(path, rowno, None, f"expected an object with columns {sorted(schema)}, "
                            f"got {type(row).__name__}")
        for col, check in schema.items():
            if col not in row or row[col] is None:
                raise DataError(path, rowno, col, f"missing column (expected columns {sorted(schema)})")
            msg = check(row[col])
            if msg:
                raise DataError(path, rowno, col, msg)
        for col, check in optional.items():
            if row.get(col) is not None:
                msg = check(row[col])
                if msg:
                    raise DataError(path, rowno, col, msg)
        out.append(convert(row, rowno) if convert else dict(row))
    if not out:
        raise DataError(path, None, None, "the file holds no rows (an empty dataset cannot be trained on)")
    return out


def official_data_path(name: str) -> Path:
    """A file of the official GDSD test data shipped with the package (``tasks/data/official``, with the
    license and a NOTICE of its origin)."""
    return Path(str(resources.files("gdsd_jax.tasks") / "data" / "official" / name))


def shipped_file_main(argv: Sequence[str] | None, *, prog: str, description: str,
                      files: Mapping[str, tuple[Callable[[], bytes], Path]], unit: str,
                      header_lines: int = 0) -> int:
    """Command line of the generated data files shipped with the package, one per split (``files``: split ->
    ``(make, shipped_path)``, the first split the default): ``--regenerate [--split S] [--out PATH]`` writes
    ``make()`` (default: over the shipped file), ``--check [--split S]`` exits 1 unless the shipped file
    regenerates byte for byte. ``unit`` names a row in the summary (``"puzzles"``); ``header_lines`` are
    not counted."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--regenerate", action="store_true", help="write the file (default: the shipped file)")
    group.add_argument("--check", action="store_true", help="verify the shipped file regenerates byte for byte")
    parser.add_argument("--split", choices=list(files), default=next(iter(files)),
                        help="which shipped file (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output path for --regenerate")
    args = parser.parse_args(argv)
    make, shipped = files[args.split]
    data = make()
    if args.check:
        same = shipped.read_bytes() == data
        print(f"{shipped.name}: {'identical' if same else 'DIFFERS from the generator'}")
        return 0 if same else 1
    out = args.out or shipped
    out.write_bytes(data)
    rows = data.count(b"\n") - header_lines
    print(f"wrote {len(data)} bytes ({rows} {unit}) to {out}")
    return 0
