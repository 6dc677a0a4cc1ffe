"""What ``uirl run`` / ``uirl deploy`` show of Flower's output, and a status line between rounds.

Flower streams its whole log (INFO chatter included, with terminal colour codes); the concise view
keeps uirl's own lines, Flower's warnings and errors and tracebacks. The full log is kept in the
run directory as ``flower.log``, without colour codes.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

#: Terminal escape sequences (colours, cursor movement) in Flower's log lines.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: Flower's per-round INFO/DEBUG log lines (printed twice: console and file format).
_CHATTER = re.compile(r"^(INFO|DEBUG)\b|^\d\d/\d\d/\d{4} [\d:]+:(INFO|DEBUG):")

#: Flower 1.41's simulation prints this on every run, whatever the size it was given (the wrapper
#: always gives one, and prints it): misleading, so the concise view drops it.
_MISLEADING = ("default simulated SuperNodes changed from 10 to 2",)


#: The prefix Ray puts before a simulated silo's output line.
_ACTOR = re.compile(r"^\((?:ClientAppActor|\w+Actor)\s+pid=\d+\)\s+(?=uirl: )")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class ConciseLog:
    """Writes the lines a user wants to see (uirl's round lines and table, Flower's warnings and
    errors, tracebacks) to ``out`` (default: ``sys.stdout`` at the time of writing); drops Flower's
    INFO/DEBUG chatter. ``verbose=True`` keeps every line. Colour codes are kept only on a terminal."""

    def __init__(self, out=None, *, verbose: bool = False) -> None:
        self._out = out
        self.verbose = verbose

    @property
    def out(self):
        return self._out if self._out is not None else sys.stdout

    def write(self, line: str) -> None:
        plain = strip_ansi(line)
        if not self.verbose and (_CHATTER.match(plain) or any(m in plain for m in _MISLEADING)):
            return
        if not self.verbose and _ACTOR.match(plain):  # a silo's own line: without Ray's actor prefix
            line = plain = _ACTOR.sub("", plain)
        isatty = getattr(self.out, "isatty", lambda: False)
        self.out.write(line if isatty() else plain)

    def flush(self) -> None:
        self.out.flush()

    def watch(self, run_info: Path, *, silos: int) -> "RunProgress":
        """A status line under the output while the run goes (on a terminal; else nothing)."""
        return RunProgress(run_info, silos=silos)


def read_run_info(run_info: Path) -> Path | None:
    """The run directory the ServerApp announced in ``run_info`` (see :func:`uirl.rundir.announce`)."""
    try:
        return Path(json.loads(Path(run_info).read_text(encoding="utf-8"))["run-dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _rows(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return rows


def phase(run_dir: Path | None, *, silos: int) -> str:
    """What the run is doing now, from the files the server has written so far."""
    if run_dir is None:
        return "starting the run (Flower, the silos, the encoder)"
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        rounds = int(config["run-config"]["num-server-rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        rounds = None
    done = max((int(r["round"]) for r in _rows(run_dir / "metrics.jsonl") if "round" in r), default=-1)
    if done < 0:
        return f"round 0: {silos} silos evaluate the pretrained encoder"
    if rounds is not None and done >= rounds:
        return "writing the final adapter"
    current = done + 1
    of = f" of {rounds}" if rounds is not None else ""
    trained = {str(r.get("silo")) for r in _rows(run_dir / "privacy.jsonl") if r.get("round") == current}
    if trained:
        return f"round {current}{of}: silos evaluate the new global model"
    return f"round {current}{of}: {silos} silos train locally"


class RunProgress:
    """A rich spinner line (phase and time spent in it) below the output, on a terminal only.
    Lines written to ``sys.stdout`` meanwhile appear above it."""

    def __init__(self, run_info: Path, *, silos: int, console=None) -> None:
        from rich.console import Console

        self.run_info = Path(run_info)
        self.silos = silos
        self.console = console or Console()
        self._status = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _text(self, current: str, since: float) -> str:
        seconds = int(time.time() - since)
        return f"{current}  [dim]{seconds // 60}:{seconds % 60:02d}[/dim]"

    def _loop(self) -> None:
        current, since = None, time.time()
        while not self._stop.wait(0.5):
            now = phase(read_run_info(self.run_info), silos=self.silos)
            if now != current:
                current, since = now, time.time()
            self._status.update(self._text(current, since))

    def __enter__(self) -> "RunProgress":
        if self.console.is_terminal:
            self._status = self.console.status(self._text(phase(None, silos=self.silos), time.time()))
            self._status.start()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._status is not None:
            self._status.stop()
