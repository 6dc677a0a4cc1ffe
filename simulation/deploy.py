"""``python -m simulation.deploy``: an alias of ``uirl deploy`` (:mod:`uirl.launch.deployment`)."""

from __future__ import annotations

import sys

from uirl.launch.deployment import CONNECTION, Deployment  # noqa: F401
from uirl.launch.processes import ROOT

CREDENTIALS_SCRIPT = ROOT / "deploy" / "generate-credentials.sh"


def main(argv: list[str] | None = None) -> int:
    from uirl.cli import main as uirl_main

    return uirl_main(["deploy", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
