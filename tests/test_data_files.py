"""User data files: undecodable text and unreadable Parquet are DataErrors naming the file (and the row),
a UTF-8 byte-order mark is accepted."""

from __future__ import annotations

import json

import pytest

from gdsd_jax.tasks.files import DataError, is_nonempty_str, load_rows

SCHEMA = {"question": is_nonempty_str, "answer": is_nonempty_str}
ROW = {"question": "1+1?", "answer": "2"}


def test_non_utf8_jsonl_names_the_file_and_row(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_bytes(json.dumps(ROW).encode() + b"\n" + b'{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xe9 at column 18\)") as err:
        load_rows(p, SCHEMA)
    assert err.value.row == 2 and err.value.path == str(p)


def test_non_utf8_csv_names_the_file_and_line(tmp_path):
    p = tmp_path / "data.csv"
    p.write_bytes(b"question,answer\n1+1?,2\ncaf\xe9,3\n")
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_rows(p, SCHEMA)
    assert err.value.row == 3 and err.value.path == str(p)


@pytest.mark.parametrize("suffix, body", [
    (".jsonl", (json.dumps(ROW) + "\n").encode()),
    (".csv", b"question,answer\n1+1?,2\n"),
])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, suffix, body):
    p = tmp_path / f"data{suffix}"
    p.write_bytes(b"\xef\xbb\xbf" + body)
    assert load_rows(p, SCHEMA) == [ROW]


def test_corrupt_parquet_names_the_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"question": ["1+1?"] * 50, "answer": ["2"] * 50}), good)
    assert len(load_rows(good, SCHEMA)) == 50
    data = bytearray(good.read_bytes())
    for bad, content in (("truncated.parquet", bytes(data[: len(data) // 2])),
                         ("garbage.parquet", b"this is not parquet at all\n" * 4),
                         ("flipped.parquet", bytes(data[:4] + b"\x00" * (len(data) - 8) + data[-4:]))):
        p = tmp_path / bad
        p.write_bytes(content)
        with pytest.raises(DataError, match="not a readable Parquet file") as err:
            load_rows(p, SCHEMA)
        assert err.value.path == str(p)
