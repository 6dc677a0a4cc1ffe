"""How many CPU threads torch uses in a process that trains or evaluates silos (run config ``torch-threads``).

Why not torch's own default (one thread per core): several processes that each take every core
oversubscribe the machine. Measured on a shared 2-core machine (``python -m simulation.bench
--only threads``): under load, 2 threads made a DP step 1.5-2.3x and a silo's evaluation up to 47x
slower than 1 thread; on a quiet machine 2 threads made one process's step 1.8x faster. So the
automatic choice caps torch at the process's *share* of the cores: ``OMP_NUM_THREADS`` when
something set it (Flower's simulation runs each silo in a Ray actor and sets it to the CPUs that
silo was given, ``--cpus-per-client``, 1 by default; a user may set it too), else every core this
process may use (the in-process engine, a deployed SuperNode). It only ever lowers the count, so a
script that chose fewer threads itself (``--threads`` of the sweep and the benchmarks) keeps them.
``torch-threads = N`` sets exactly N.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def automatic_threads(environ: os._Environ | dict = os.environ) -> int:
    """``OMP_NUM_THREADS`` if set to a whole number >= 1, else :func:`usable_cores`."""
    value = str(environ.get("OMP_NUM_THREADS", "")).strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    return usable_cores()


def apply_threads(requested: int) -> int:
    """Set torch's intra-op threads to ``requested``, or (0) lower them to :func:`automatic_threads`
    if they are above it; return the count now in use."""
    threads = requested or min(torch.get_num_threads(), automatic_threads())
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
