"""How the benchmarks measure: the machine, interleaved repeats, child processes, process-tree memory.

Shared by ``python -m simulation.bench`` and the older single-purpose scripts
(:mod:`simulation.bench_paths`, :mod:`simulation.bench_data`).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

#: The project directory (what child processes run from and put first on their path).
ROOT = Path(__file__).resolve().parents[2]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, library versions, torch threads.
    Read from package metadata, so nothing (Flower included) is imported to learn its version."""
    import torch

    from uirl.threads import usable_cores

    usable = usable_cores()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"cpu-model": _cpu_model(), "cores": os.cpu_count(), "usable-cores": usable,
            "memory-gib": round(memory, 1) if memory else None, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "flwr": _version("flwr"),
            "transformers": _version("transformers"), "peft": _version("peft"), "opacus": _version("opacus"),
            "torch-threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "load-average": [round(x, 2) for x in os.getloadavg()]}


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(calls: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` times, the calls taking turns (A B C, then C B A, ...), so
    that a machine whose speed drifts (other jobs, throttling) slows every call alike. ``warmup``
    untimed rounds first (lazy initialisation, allocator, caches)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(calls[name]))
    return times


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and every value (seconds)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "all": list(values)}


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """The high-water mark of a living process's resident memory (``VmHWM``), in MiB; None where
    ``/proc`` does not say (the process has exited, or not Linux). Not ``ru_maxrss``: Linux carries a
    parent's high-water mark into a child across fork and exec, so every child of a big process
    would report at least the parent's peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Child:
    """A finished (or stopped) child process: wall seconds, peak resident memory, output."""

    seconds: float
    peak_rss_mib: float
    stdout: str
    returncode: int | None
    timed_out: bool = False
    lines: list[str] = field(default_factory=list)


def run_child(args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None,
              on_line: Callable[[str], None] | None = None) -> Child:
    """Run ``python args...`` from the project directory; its peak RSS is its own high-water mark
    (:func:`peak_rss_mib`, read every 0.1 s while it runs). Stopped with SIGKILL after
    ``timeout`` seconds (``timed_out``; what it printed until then is kept). ``on_line`` sees each
    output line as it comes."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=environment, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in child.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out, peak = False, None
    while True:
        now = peak_rss_mib(child.pid)
        peak = now if peak is None or (now is not None and now > peak) else peak
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.perf_counter() - began > timeout:
            child.kill()
            _, status, usage = os.wait4(child.pid, 0)
            timed_out = True
            break
        time.sleep(0.1)
    seconds = time.perf_counter() - began
    child.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    reader.join(timeout=10)
    if peak is None:  # no /proc: the kernel's figure, an upper bound (see peak_rss_mib)
        peak = usage.ru_maxrss / 1024
    return Child(seconds=seconds, peak_rss_mib=peak, stdout="".join(lines),
                 returncode=None if timed_out else code, timed_out=timed_out, lines=[x.rstrip("\n") for x in lines])


class TreeMemory:
    """Samples the summed memory of a set of processes in a background thread, keeping the peak.

    ``select(pid, environ)`` picks the processes (e.g. those whose environment names one Flower
    home: every process of one launch inherits it). RSS sums count shared pages (libtorch) once
    per process; PSS shares them out, so its sum is the memory the processes really occupy.
    Needs ``psutil``; without it ``available`` is False and nothing is measured."""

    def __init__(self, select: Callable[[int, dict], bool], *, every: float = 0.5) -> None:
        self.select = select
        self.every = every
        self.peak_rss = self.peak_pss = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = importlib.util.find_spec("psutil") is not None

    def _sample(self) -> None:
        import psutil

        rss = pss = count = 0
        for proc in psutil.process_iter():
            try:
                if proc.uids().real != os.getuid() or not self.select(proc.pid, proc.environ()):
                    continue
                info = proc.memory_full_info()
            except (psutil.Error, OSError):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            count += 1
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.processes = max(self.processes, count)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "TreeMemory":
        if self.available:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def result(self) -> dict:
        if not self.available:
            return {"measured": False, "why": "psutil is not installed"}
        return {"measured": True, "peak-rss-sum-mib": round(self.peak_rss / 2**20), "peak-pss-sum-mib":
                round(self.peak_pss / 2**20), "most-processes": self.processes, "sampled-every-seconds": self.every}
