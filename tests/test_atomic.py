"""atomic_write: the one way kfdeploy replaces a file, whole or not at all."""
import pytest

from kfdeploy.atomic import atomic_write


def test_the_written_file_replaces_the_old_one_and_no_temporary_file_stays(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing is visible before the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "engine.plan"
    target.write_bytes(b"old engine")
    with pytest.raises(RuntimeError, match="builder died"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half an eng")
            raise RuntimeError("builder died")
    assert target.read_bytes() == b"old engine"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]


def test_a_writer_that_writes_nothing_is_an_error_not_an_empty_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    with pytest.raises(FileNotFoundError):
        with atomic_write(target):
            pass
    assert not target.exists()


def test_two_writers_of_one_file_get_separate_temporary_files(tmp_path):
    target = tmp_path / "bundle.tar.gz"
    with atomic_write(target) as first, atomic_write(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block ends last and wins, whole
