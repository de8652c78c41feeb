import pytest

from composer_sheared.storage.atomic import atomic_directory


def test_success_replaces_and_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing visible until the block completes
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # the old directory is untouched
    with atomic_directory(out) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or trash left
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(out, overwrite=False):
            pass
