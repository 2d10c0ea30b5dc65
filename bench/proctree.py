"""Run a command as a child and measure its memory: the child's own peak RSS, and the summed
memory of its whole process tree (driver + the Ray processes it starts), sampled from /proc.

psutil is not a dependency of the project, so the tree is read from /proc directly (Linux only).

Peaks come from each process's VmHWM (the kernel's high-water mark of the process's own address
space, reset by exec), not from wait4/getrusage's ru_maxrss: a child started with fork or vfork
inherits its parent's peak RSS into ru_maxrss, so a child of a big parent reports the parent's
figure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB = 2**20
# Reading PSS (smaps_rollup walks every mapping) costs ~1.5 ms per process, some 50 ms for a
# Ray job's tree: taken at every 5th sample only, so that the sampler takes a few per cent of
# one core from the job it measures, not a third of it. RSS and VmHWM are cheap: every sample.
PSS_EVERY = 5


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now running."""
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # The command name is in parentheses and may itself hold spaces or parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        parents[int(name)] = int(fields[1])
    return parents


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (libraries, Ray's object store) divided among the
    processes that map them, so that a sum over processes counts each page once."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _hwm(pid: int | str) -> int:
    """Peak RSS of the process's current program (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM")  # a kernel thread, or a process exiting


def own_peak_rss() -> int | None:
    """This process's peak RSS since it started its program, or None off Linux."""
    try:
        return _hwm("self")
    except (OSError, ValueError):
        return None


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


@dataclass
class TreeMemory:
    """Peaks over the samples of a process tree."""

    samples: int = 0
    pss_samples: int = 0
    peak_rss_sum: int = 0  # the largest sum over the tree of RSS (counts shared pages repeatedly)
    peak_pss_sum: int = 0  # the largest sum over the tree of PSS (counts each page once)
    peak_processes: int = 0
    names: set[str] = field(default_factory=set)
    # pid -> its VmHWM at the last sample that saw it. The last, not the largest: a process
    # caught between fork and exec shows its parent's figure, and VmHWM only grows after exec.
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    root: int = 0

    @property
    def root_peak_rss(self) -> int | None:
        return self.peak_by_pid.get(self.root)

    @property
    def sum_of_process_peaks(self) -> int:
        """Each process's own peak, summed: an upper bound of the tree's RSS at any one time
        (the peaks need not coincide), and shared pages count once per process."""
        return sum(self.peak_by_pid.values())

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "pss_samples": self.pss_samples,
            "peak_rss_sum_mib": round(self.peak_rss_sum / MIB, 1),
            "peak_pss_sum_mib": round(self.peak_pss_sum / MIB, 1),
            "sum_of_process_peak_rss_mib": round(self.sum_of_process_peaks / MIB, 1),
            "peak_processes": self.peak_processes,
            "process_names": sorted(self.names),
        }


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree every `interval` seconds until stopped."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.memory = TreeMemory(root=root)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        memory = self.memory
        with_pss = memory.samples % PSS_EVERY == 0
        rss = pss = processes = 0
        for pid in descendants(self.root):
            try:
                rss_now, hwm = _rss(pid), _hwm(pid)
                pss += _pss(pid) if with_pss else 0
            except (OSError, ValueError):  # exited between listing and reading
                continue
            rss += rss_now
            memory.peak_by_pid[pid] = hwm
            processes += 1
            memory.names.add(_name(pid))
        memory.samples += 1
        memory.peak_rss_sum = max(memory.peak_rss_sum, rss)
        if with_pss:
            memory.pss_samples += 1
            memory.peak_pss_sum = max(memory.peak_pss_sum, pss)
        memory.peak_processes = max(memory.peak_processes, processes)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> TreeMemory:
        self._stop_event.set()
        self.join()
        return self.memory


@dataclass
class Finished:
    returncode: int
    wall_seconds: float
    tree: TreeMemory
    log: str

    @property
    def peak_rss(self) -> int | None:
        """The child's own peak RSS (its VmHWM at the last sample, at most `interval` before it
        exited)."""
        return self.tree.root_peak_rss


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that a killed benchmark stops its child too."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_measured(command: list[str], log_path: str, *, interval: float = 0.2,
                 cwd: str | None = None, env: dict | None = None) -> Finished:
    """Run `command` to its end (output to `log_path`), sampling the memory of its process tree."""
    with open(log_path, "wb") as log:
        # Popen returns once the child has exec'd, so no sample sees it as a copy of this process.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        started = time.perf_counter()
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        try:
            proc.wait()
        except BaseException:  # interrupted: stop the child (Ray shuts down with it) first
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            wall = time.perf_counter() - started
            tree = sampler.stop()
    with open(log_path, errors="replace") as f:
        text = f.read()
    return Finished(proc.returncode, wall, tree, text)


def run_worker(workers: dict, kind: str, params_path: str, result_path: str) -> None:
    """A benchmark's child: `workers[kind]` on the JSON parameters at `params_path`, its result
    written as JSON to `result_path` for the parent to read."""
    with open(params_path) as f:
        params = json.load(f)
    result = workers[kind](params)
    with open(result_path, "w") as f:
        json.dump(result, f)
