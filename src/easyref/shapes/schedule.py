"""Run the steps of a long job several at a time, each command in its own process.

Why: the ShapesWorld models are too small for a second torch thread to pay, so on a small CPU two
processes with one thread each get more done than one process with two threads (1.5 times as much on
2 cores: benchmarks/parallel_steps.py), and
independent steps (the judge and the CLIP, the ablations, the benchmark runs) need not wait for each
other. A step is a function that runs ``easyref`` commands through :func:`command`; it starts once
the steps it comes ``after`` have finished. Each step's output goes to its own log file, the console
shows one bar over all steps, and every invocation's wall time and step times are appended to a
timings file, so a run resumed over several sessions still says what it cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from graphlib import TopologicalSorter
from pathlib import Path

from easyref.errors import EasyRefError
from easyref.files import atomic_write

LOG_TAIL_LINES = 15


class StepError(EasyRefError):
    """A step's command failed; its log says why."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One unit of work: ``run()`` executes it (its commands are resumable), ``after`` names the steps
    it needs, and ``done()`` says it has nothing left to do (then no process is started for it)."""

    name: str
    run: Callable[[], None]
    after: tuple[str, ...] = ()
    done: Callable[[], bool] = lambda: False


_current = threading.local()   # the running step's log file and thread count, for run_process()
_processes: set[subprocess.Popen] = set()
_processes_lock = threading.Lock()
_stopping = threading.Event()  # set on an interruption: no new process starts


def cores() -> int:
    """The cores this process may use (its CPU affinity, where the platform says; else all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def default_jobs() -> int:
    """Steps run at once by default: one per core, at most four (ShapesWorld rarely has more steps ready at
    once, and each process holds 0.5-0.8 GB)."""
    return max(1, min(4, cores()))


def run_process(argv: Sequence[object], name: str) -> None:
    """Run ``argv``; inside a step its output goes to the step's log (unbuffered, so the log is current) and
    torch uses the step's threads. Raises :class:`StepError`, naming the command as ``name``, if it fails
    or if the run is being stopped."""
    argv = [str(arg) for arg in argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = getattr(_current, "threads", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log = getattr(_current, "log", None)
    with open(log, "a") if log is not None else contextlib.nullcontext() as out:
        if out is not None:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
        with _processes_lock:  # no process may start once a stop has terminated the running ones
            if _stopping.is_set():
                raise StepError(f"{name}: not started, the run is stopping")
            process = subprocess.Popen(argv, env=env, stdout=out,
                                       stderr=subprocess.STDOUT if out is not None else None)
            _processes.add(process)
        try:
            code = process.wait()
        finally:
            with _processes_lock:
                _processes.discard(process)
    if code != 0:
        where = f"; its output is in {log}" if log is not None else ""
        raise StepError(f"{name} failed (exit {code}){where}")


def command(args: Sequence[object]) -> None:
    """Run ``python -m easyref ARGS`` as :func:`run_process` does."""
    args = [str(arg) for arg in args]
    run_process([sys.executable, "-m", "easyref", *args], name=f"'easyref {' '.join(args[:2])}'")


def _log_name(step: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in step) + ".log"


def _tail(path: Path) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").replace("\r", "\n").splitlines()[-LOG_TAIL_LINES:])


def _stop_processes() -> None:
    with _processes_lock:
        _stopping.set()
        running = list(_processes)
    for process in running:
        process.terminate()


@contextlib.contextmanager
def _terminations_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal, a job scheduler, a session ending) stop the run as Ctrl-C
    does, so the running commands are stopped too instead of running on as orphans."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {name: signal.signal(getattr(signal, name), interrupt) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


class _Run:
    """One invocation of :func:`run_steps`: what runs, what finished, and its record in the timings file.

    The record is rewritten whenever a step starts or ends and at least once a minute, so a run that
    is killed outright (a session ending) still leaves its wall time and its steps' times so far."""

    def __init__(self, steps: Sequence[Step], jobs: int, logs: Path | None, timings: Path | None, bar) -> None:
        self.by_name = {step.name: step for step in steps}
        self.order = {name: index for index, name in enumerate(self.by_name)}
        self.jobs, self.logs, self.timings, self.bar = jobs, logs, timings, bar
        self.threads = max(1, cores() // jobs)
        self.clock = time.monotonic()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.failed_seconds: dict[str, float] = {}
        self.earlier = json.loads(timings.read_text())["runs"] if timings is not None and timings.is_file() else []
        self.record = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "jobs": jobs, "threads": self.threads}

    def say(self, message: str) -> None:
        """A line above the bar; nothing when the bar is off (``progress=False``)."""
        if not self.bar.disable:
            self.bar.write(message)

    def log(self, name: str) -> Path | None:
        return self.logs / _log_name(name) if self.logs is not None else None

    def save(self) -> None:
        """Rewrite the timings file: earlier invocations, then this one as it stands."""
        if self.timings is None:
            return
        now = time.monotonic()
        record = {**self.record, "wall_seconds": round(now - self.clock, 1),
                  "steps": {name: round(value, 1) for name, value in self.seconds.items()},
                  "unfinished": {name: round(now - start, 1) for name, start in self.started.items()
                                 if name not in self.seconds and name not in self.failed},
                  "failed": {name: round(self.failed_seconds[name], 1) for name in self.failed}}
        runs = [*self.earlier, record]
        total = round(sum(run["wall_seconds"] for run in runs), 1)
        text = json.dumps({"wall_seconds": total, "runs": runs}, indent=2)
        atomic_write(self.timings, lambda tmp: tmp.write_text(text))

    def execute(self, name: str) -> None:
        """Run step ``name`` (in a pool thread) with its log and thread count for :func:`command`."""
        _current.log, _current.threads = self.log(name), self.threads
        try:
            self.by_name[name].run()
        except Exception as error:
            log = self.log(name)
            if log is not None and not isinstance(error, EasyRefError):  # a bug: its traceback, for the report
                with open(log, "a") as out:
                    out.write("".join(traceback.format_exception(error)))
            raise
        finally:
            _current.log = _current.threads = None

    def schedule(self, pool: ThreadPoolExecutor, graph: TopologicalSorter) -> None:
        """Start ready steps (earliest listed first) while fewer than ``jobs`` run; collect each as it ends."""
        ready: list[str] = []
        running: dict[Future, str] = {}
        while graph.is_active():
            ready = sorted(set(ready) | set(graph.get_ready()), key=self.order.__getitem__)
            while ready and not self.failed and len(running) < self.jobs:
                name = ready.pop(0)
                if self.by_name[name].done():
                    graph.done(name)
                    self.bar.update()
                    ready = sorted(set(ready) | set(graph.get_ready()), key=self.order.__getitem__)
                    continue
                log = self.log(name)
                self.say(f"{name}: started" + (f" (output: {log})" if log is not None else ""))
                self.started[name] = time.monotonic()
                self.save()
                running[pool.submit(self.execute, name)] = name
            self.bar.set_postfix_str(", ".join(sorted(running.values(), key=self.order.__getitem__)))
            self.save()  # again each minute while steps run (wait's timeout)
            if not running:
                return
            finished, _ = wait(running, timeout=60, return_when=FIRST_COMPLETED)
            for future in finished:
                self.collect(running.pop(future), future, graph)

    def collect(self, name: str, future: Future, graph: TopologicalSorter) -> None:
        self.bar.update()
        error = future.exception()
        if error is not None:
            self.failed[name] = str(error) if isinstance(error, EasyRefError) else f"{type(error).__name__}: {error}"
            self.failed_seconds[name] = time.monotonic() - self.started[name]
            tail = _tail(self.log(name)) if self.logs is not None else ""
            self.say(f"{name} failed: {self.failed[name]}" + (f"\n{tail}" if tail else ""))
            return
        self.seconds[name] = time.monotonic() - self.started[name]
        self.say(f"{name}: finished in {self.seconds[name] / 60:.1f} min")
        graph.done(name)


def run_steps(steps: Sequence[Step], *, jobs: int = 1, logs: Path | None = None, timings: Path | None = None,
              progress: bool = True) -> dict[str, float]:
    """Run ``steps`` in dependency order, up to ``jobs`` at a time; returns seconds per step run.

    Among the steps ready to start, the earlier in ``steps`` starts first, so list the long chains
    first. Each step's commands get ``cores // jobs`` torch threads. When a step fails, no new step
    starts, the running ones finish (their work is kept) and :class:`StepError` names the failed ones;
    on an interruption (Ctrl-C, SIGTERM, SIGHUP) the running commands are stopped, none starts after,
    and :class:`KeyboardInterrupt` is raised (each command resumes from its last checkpoint).
    ``timings`` (a JSON file) gains this invocation's wall time and step times.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    names = [step.name for step in steps]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"step names must be unique: {', '.join(twice)}")
    unknown = [f"{step.name!r} needs {need!r}" for step in steps for need in step.after if need not in names]
    if unknown:
        raise ValueError(f"unknown steps: {'; '.join(unknown)}")
    graph = TopologicalSorter({step.name: step.after for step in steps})
    graph.prepare()  # raises graphlib.CycleError on a cycle
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(steps), desc="steps", unit="step", disable=not progress)
    run = _Run(steps, jobs, logs, timings, bar)
    _stopping.clear()
    try:
        with _terminations_interrupt(), ThreadPoolExecutor(max_workers=jobs) as pool:
            try:
                run.schedule(pool, graph)
            except BaseException:
                _stop_processes()  # before the pool waits for its threads
                raise
    finally:
        bar.close()
        run.save()
    if run.failed:
        raise StepError(f"{len(run.failed)} step(s) failed: "
                        + "; ".join(f"{name}: {error}" for name, error in run.failed.items()))
    return run.seconds
