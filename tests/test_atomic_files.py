"""Atomic writes: a failed write leaves the old file and no temporary file behind."""

import json
import stat

import pytest

from spectral_jax.atomic_files import write_atomic, write_json_atomic, write_text_atomic


def test_writes_and_replaces(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "first")
    assert path.read_text() == "first"
    write_json_atomic(path, {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")

    def fail_halfway(f):
        f.write(b"half of the new cont")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(path, fail_halfway)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_files_get_the_mode_a_plain_open_gives(tmp_path):
    """The temporary file's 0o600 is not kept: the result is readable as any new file is."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = write_text_atomic(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
