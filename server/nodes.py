"""Waiting for the silos, visibly and for a bounded time.

Flower's strategies wait for ``min_available_nodes`` connected SuperNodes in
``flwr.serverapp.strategy.strategy_utils.sample_nodes``: a loop without end whose only trace is an
INFO log line a second (hidden by ``uirl run``'s concise output). A run asked for more silos than
will ever connect (``min-nodes=3`` with 2 SuperNodes) therefore hangs with no message. The
ServerApp calls :func:`wait_for_nodes` before each round instead: once it returns, Flower's own
wait finds enough nodes at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.serverapp import Grid

from uirl.errors import RunFailed

#: Seconds between two "waiting for ..." lines.
REPORT_EVERY = 10.0


def wait_for_nodes(grid: Grid, min_nodes: int, *, timeout: float, report_every: float = REPORT_EVERY,
                   poll: float = 1.0, say: Callable[[str], None] = lambda line: print(line, flush=True)) -> list[int]:
    """The connected node ids once at least ``min_nodes`` are connected. Says every ``report_every``
    seconds how many it waits for; raises :class:`~uirl.errors.RunFailed` after ``timeout`` seconds."""
    start = time.monotonic()
    next_report = start
    while len(nodes := list(grid.get_node_ids())) < min_nodes:
        now = time.monotonic()
        if now - start >= timeout:
            raise RunFailed(f"only {len(nodes)} of the {min_nodes} silos the run needs (min-nodes) connected "
                            f"within node-wait-timeout = {timeout:g} s; start more SuperNodes or lower min-nodes")
        if now >= next_report:
            say(f"uirl: waiting for {min_nodes} silos, {len(nodes)} connected "
                f"(giving up after {timeout:g} s, node-wait-timeout)")
            next_report = now + report_every
        time.sleep(min(poll, max(0.0, timeout - (now - start))))
    return nodes
