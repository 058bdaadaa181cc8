"""Atomic writes keep the previous file when a write fails, and leave no temporary behind."""

from __future__ import annotations

import pytest

from rdkd.files import atomic_write, atomic_write_csv, atomic_write_json


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text("{\"a\": ")  # half written, then the writer dies
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_csv_and_nested_folders(tmp_path):
    path = tmp_path / "new" / "folder" / "table.csv"
    atomic_write_csv(path, ["k", "v"], [("x", 1), ("y", 2)])
    assert path.read_text().splitlines() == ["k,v", "x,1", "y,2"]
