"""Atomic publishing: readers see the old file or folder or the new one, never a mix, with usual permissions."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from easyref.errors import FolderInUseError
from easyref.files import (
    LOCK_FILE,
    _host_tag,
    atomic_folder,
    atomic_write,
    folder_lock,
    remove_stale_temporaries,
)


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


# -- stale temporaries and folder locks ---------------------------------------------------------------

def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporary(folder, target: str, host: str, pid: int, suffix: str = ".tmp.png"):
    path = folder / f".{target}.{host}-{pid}.abcdefgh{suffix}"
    path.write_text("half written")
    return path


def test_a_writer_killed_with_sigkill_leaves_a_temporary_that_the_next_write_of_that_file_removes(tmp_path):
    target = tmp_path / "keep_0.png"
    script = ("import sys, time; from easyref.files import atomic_path\n"
              f"with atomic_path({str(target)!r}) as tmp:\n"
              "    tmp.write_text('partial'); print('ready', flush=True); time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".keep_0.png.") and not target.exists()
    atomic_write(target, lambda tmp: tmp.write_text("whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["keep_0.png"] and target.read_text() == "whole"


def test_only_dead_writers_temporaries_of_this_host_and_target_are_removed(tmp_path):
    host = _host_tag()
    dead = _temporary(tmp_path, "a.png", host, _dead_pid())
    live = _temporary(tmp_path, "a.png", host, os.getpid())
    elsewhere = _temporary(tmp_path, "a.png", "ffffff" if host != "ffffff" else "000000", _dead_pid())
    other_target = _temporary(tmp_path, "b.png", host, _dead_pid())
    folder = tmp_path / f".group.{host}-{_dead_pid()}.abcdefgh.tmp"
    folder.mkdir()
    (folder / "0.png").write_text("x")
    assert remove_stale_temporaries(tmp_path, "a.png") == [dead]
    assert live.exists() and elsewhere.exists() and other_target.exists()
    assert set(remove_stale_temporaries(tmp_path)) == {other_target, folder}
    assert live.exists() and elsewhere.exists()


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_goes_when_done(tmp_path):
    with folder_lock(tmp_path / "run", "easyref train --stage align") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(FolderInUseError, match=rf"in use by easyref train --stage align \(pid {os.getpid()}"):
            with folder_lock(tmp_path / "run", "easyref bench run"):
                pass
        assert lock.exists()  # the refused writer did not remove the holder's lock
    assert not lock.exists()
    with folder_lock(tmp_path / "run", "again"):
        pass


def test_a_dead_processes_lock_is_taken_over_with_a_notice_and_another_hosts_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "old run"}))
    with folder_lock(run, "new run") as lock:
        assert json.loads(lock.read_text())["command"] == "new run"
    assert f"locked by process {pid}, which is no longer running (old run); taking it over" in capsys.readouterr().err
    (run / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": "another-machine", "command": "far run"}))
    with pytest.raises(FolderInUseError, match="far run .* on another-machine.*delete .*\\.easyref\\.lock"):
        with folder_lock(run, "new run"):
            pass


def test_the_next_run_finishes_a_pruning_that_a_kill_interrupted(tmp_path):
    from easyref.training import checkpoints

    for step in (10, 20, 30):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / checkpoints.STATE_FILE).write_text("{}")
    moved_aside = tmp_path / f".checkpoint-0.{_host_tag()}-{_dead_pid()}.abcdefgh.old"  # killed mid-delete
    (moved_aside / "checkpoint-0").mkdir(parents=True)
    half_saved = tmp_path / ".checkpoint-40.tmp"
    half_saved.mkdir()
    checkpoints.remove_partial(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30"]
