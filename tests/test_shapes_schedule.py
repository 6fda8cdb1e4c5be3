"""Running a long job's steps several at a time: dependency order, concurrency, skipping, failures, logs and
timings (``easyref.shapes.schedule``, which ``shapes reproduce`` runs on)."""

from __future__ import annotations

import graphlib
import json
import os
import signal
import sys
import threading
import time

import pytest

from easyref.shapes import schedule
from easyref.shapes.schedule import Step, StepError, command, run_process, run_steps


def _recording(events: list, name: str, action=None):
    def run():
        events.append(("start", name))
        if action is not None:
            action()
        events.append(("end", name))
    return run


def test_a_step_starts_only_after_the_steps_it_needs_have_ended():
    events = []
    steps = [Step("c", _recording(events, "c"), after=("a", "b")), Step("a", _recording(events, "a")),
             Step("b", _recording(events, "b"), after=("a",))]
    seconds = run_steps(steps, jobs=2, progress=False)
    assert set(seconds) == {"a", "b", "c"}
    position = {event: index for index, event in enumerate(events)}
    assert position[("end", "a")] < position[("start", "b")]
    assert position[("end", "b")] < position[("start", "c")]


def test_independent_steps_run_at_the_same_time_up_to_jobs():
    """Two steps that each wait for the other can only finish when both run at once."""
    both = threading.Barrier(2, timeout=10)
    steps = [Step("left", both.wait), Step("right", both.wait)]
    run_steps(steps, jobs=2, progress=False)
    alone = threading.Barrier(2, timeout=0.5)
    with pytest.raises(StepError, match="left") as error:
        run_steps([Step("left", alone.wait), Step("right", alone.wait)], jobs=1, progress=False)
    assert "right" not in str(error.value)  # after the first failure nothing new starts


def test_ready_steps_start_in_the_order_they_are_listed():
    events = []
    steps = [Step(name, _recording(events, name)) for name in ("first", "second", "third")]
    run_steps(steps, jobs=1, progress=False)
    assert [name for kind, name in events if kind == "start"] == ["first", "second", "third"]


def test_a_done_step_is_skipped_and_what_needs_it_still_runs():
    events = []
    steps = [Step("finished", _recording(events, "finished"), done=lambda: True),
             Step("next", _recording(events, "next"), after=("finished",))]
    assert set(run_steps(steps, jobs=1, progress=False)) == {"next"}
    assert events == [("start", "next"), ("end", "next")]


def test_a_failed_step_stops_what_needs_it_and_lets_running_steps_finish(tmp_path):
    events = []
    release = threading.Event()

    def fail():
        release.wait(10)  # the other step is running by now
        raise StepError("broken on purpose")

    def slow():
        release.set()
        events.append("slow finished")

    steps = [Step("fails", fail), Step("slow", slow), Step("needs it", _recording(events, "needs it"),
                                                             after=("fails",))]
    with pytest.raises(StepError, match="1 step\\(s\\) failed: fails: broken on purpose"):
        run_steps(steps, jobs=2, progress=False, timings=tmp_path / "timings.json")
    assert events == ["slow finished"]
    record = json.loads((tmp_path / "timings.json").read_text())["runs"][0]
    assert list(record["failed"]) == ["fails"] and record["failed"]["fails"] >= 0  # its time counts too
    assert list(record["steps"]) == ["slow"]


def test_bad_graphs_are_refused():
    with pytest.raises(ValueError, match="unknown steps: 'a' needs 'missing'"):
        run_steps([Step("a", lambda: None, after=("missing",))], progress=False)
    with pytest.raises(ValueError, match="step names must be unique: a"):
        run_steps([Step("a", lambda: None), Step("b", lambda: None), Step("a", lambda: None)], progress=False)
    with pytest.raises(graphlib.CycleError):
        run_steps([Step("a", lambda: None, after=("b",)), Step("b", lambda: None, after=("a",))], progress=False)
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        run_steps([Step("a", lambda: None)], jobs=0, progress=False)


def test_timings_add_up_every_invocation(tmp_path):
    timings = tmp_path / "timings.json"
    for jobs in (1, 2):
        run_steps([Step("a", lambda: None)], jobs=jobs, progress=False, timings=timings)
    data = json.loads(timings.read_text())
    assert [run["jobs"] for run in data["runs"]] == [1, 2]
    assert data["wall_seconds"] == pytest.approx(sum(run["wall_seconds"] for run in data["runs"]), abs=0.11)
    assert all(set(run["steps"]) == {"a"} and run["failed"] == {} for run in data["runs"])


def test_a_commands_output_goes_to_its_steps_log(tmp_path):
    from easyref import __version__

    logs = tmp_path / "logs"
    run_steps([Step("say version", lambda: command(["--version"]))], logs=logs, progress=False)
    text = (logs / "say-version.log").read_text()
    assert text.splitlines()[0].endswith("-m easyref --version")
    assert f"easyref {__version__}" in text


def test_a_failed_command_names_its_log(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(StepError, match="bad step: 'easyref no-such-command' failed \\(exit 2\\); its output is in "
                                        ".*bad-step.log"):
        run_steps([Step("bad step", lambda: command(["no-such-command"]))], logs=logs, progress=False)
    assert "invalid choice: 'no-such-command'" in (logs / "bad-step.log").read_text()


def test_a_bug_in_a_step_leaves_its_traceback_in_the_log(tmp_path):
    def broken():
        return {}["missing"]

    with pytest.raises(StepError, match="broken: KeyError: 'missing'"):
        run_steps([Step("broken", broken)], logs=tmp_path, progress=False)
    text = (tmp_path / "broken.log").read_text()
    assert "Traceback" in text and 'return {}["missing"]' in text


def test_a_termination_stops_the_running_commands_and_starts_no_more(tmp_path):
    """SIGTERM (a session ending, a job scheduler) acts as Ctrl-C: the running command is stopped, the step
    does not go on to its next command, and the times so far are kept."""
    pid_file = tmp_path / "child.pid"
    started = []

    def long_step():
        sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
        started.append("first")
        try:
            run_process([sys.executable, "-c", sleeper], name="sleeper")
        finally:
            run_process([sys.executable, "-c", "import time; time.sleep(60)"], name="second")
            started.append("second")

    def terminate_soon():
        for _ in range(200):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_soon)
    killer.start()
    begin = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run_steps([Step("long", long_step)], progress=False, timings=tmp_path / "timings.json")
    killer.join()
    assert time.monotonic() - begin < 30
    assert started == ["first"]
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    record = json.loads((tmp_path / "timings.json").read_text())["runs"][-1]
    assert "long" in record["unfinished"] or "long" in record["failed"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back


def test_each_step_gets_its_share_of_the_cores(monkeypatch):
    seen = []

    class FakeProcess:
        def __init__(self, argv, env, **streams):
            seen.append(env.get("OMP_NUM_THREADS"))

        def wait(self):
            return 0

    monkeypatch.setattr(schedule.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(schedule, "cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run_steps([Step("a", lambda: command(["--version"]))], jobs=2, progress=False)
    run_steps([Step("a", lambda: command(["--version"]))], jobs=1, progress=False)
    command(["--version"])  # outside a step: the caller's environment as it is
    assert seen == ["2", "4", None]


def test_the_timings_file_is_current_while_steps_run(tmp_path):
    """A run killed outright (no cleanup) still leaves what it had done and what was running."""
    timings = tmp_path / "timings.json"
    seen = {}

    def look():
        seen.update(json.loads(timings.read_text())["runs"][-1])

    run_steps([Step("first", lambda: None), Step("looks", look, after=("first",))], timings=timings, progress=False)
    assert list(seen["steps"]) == ["first"] and list(seen["unfinished"]) == ["looks"]
    final = json.loads(timings.read_text())["runs"][-1]
    assert list(final["steps"]) == ["first", "looks"] and final["unfinished"] == {}
