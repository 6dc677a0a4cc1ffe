"""``uirl silo-worker DIR``: one silo's long-running worker (:mod:`uirl.silo_worker`)."""

from __future__ import annotations

import argparse
from pathlib import Path

_DESCRIPTION = """Keep one silo's model, data and noise plans in memory between Flower messages. A Flower
SuperNode starts a new ClientApp process for every message; given node config silo-worker="DIR", that
process hands the silo's work to this worker instead of importing torch and rebuilding the model
each time. Listens on DIR/socket (DIR is created with mode 0700; callers prove the key in
DIR/authkey, new at every start) until stopped with Ctrl-C or SIGTERM. Run it as the SuperNode's
user, with the same uirl version and the silo's data at the same paths."""


def _serve(args: argparse.Namespace) -> int:
    from uirl.silo_worker import serve

    try:
        serve(args.directory)
    except KeyboardInterrupt:
        pass
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("silo-worker", help="keep a deployed silo's model warm between messages",
                            description=_DESCRIPTION)
    worker.add_argument("directory", type=Path, help="the worker's directory (its socket and key)")
    worker.set_defaults(func=_serve)
