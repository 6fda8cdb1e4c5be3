"""Atomic publishing: readers see the old file or folder or the new one, never a mix, with usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from easyref.files import atomic_folder, atomic_write


def test_failed_block_leaves_old_folder_and_no_temporaries(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_success_replaces_whole_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_write_once_folder_refuses_an_existing_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "done.txt").write_text("done")
    with pytest.raises(OSError), atomic_folder(target, replace=False) as staging:
        (staging / "again.txt").write_text("again")
    assert [p.name for p in target.iterdir()] == ["done.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_published_files_and_folders_get_the_usual_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        written = atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        with atomic_folder(tmp_path / "folder") as staging:
            (staging / "inside.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750
