"""``python -m simulation.flower``: an alias of ``uirl run`` (:mod:`uirl.launch.simulation`), kept for
scripts and experiment runners. ``run(...)`` returns (final status, everything ``flwr run`` printed)."""

from __future__ import annotations

import sys
from pathlib import Path

from uirl.launch.output import ConciseLog  # noqa: F401  (re-exported for the experiment runners)
from uirl.launch.processes import ROOT  # noqa: F401
from uirl.launch.simulation import CONFIG_TOML, run_simulation, stop_superlink  # noqa: F401


def run(*, supernodes: int, run_config: str | None, cpus_per_client: int, app: Path | None = None,
        flwr_home: Path | None = None, log=sys.stdout) -> tuple[str, str]:
    """Run the app; return (final status, everything the run printed)."""
    result = run_simulation(supernodes=supernodes, run_config=run_config, cpus_per_client=cpus_per_client,
                            app=app, flwr_home=flwr_home, log=log)
    return result.status, result.text


def main(argv: list[str] | None = None) -> int:
    from uirl.cli import main as uirl_main

    return uirl_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
