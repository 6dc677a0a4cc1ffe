"""Check a run's configuration before anything starts.

``flwr run`` reads ``--run-config`` only once the ServerApp and ClientApps are up (30-50 s later on
a small machine), drops a token without ``=`` without a word, and reports a bad value as a
traceback. The wrappers (``uirl run``, ``uirl deploy``) therefore parse the overrides the way Flower
does (space-separated ``key=value`` pairs, each value a TOML value), merge them over the app's
``[tool.flwr.app.config]`` defaults and build the :class:`~uirl.config.Config` first: a mistake is
one line naming the key, and nothing is started.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from uirl.config import Config, from_run_config
from uirl.data.convert import MANIFEST
from uirl.errors import ConfigError

#: Flower's pattern for one override (``flwr.common.config.parse_config_args``).
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"lr=0.01 dataset='/data/x'"`` -> ``{"lr": 0.01, "dataset": "/data/x"}``, refusing what Flower
    would drop or misread."""
    if not text or not text.strip():
        return {}
    stray = _PAIR.sub(" ", text).split()
    if stray:
        raise ConfigError("--run-config: expected space-separated key=value pairs", value=stray[0])
    values: dict[str, Any] = {}
    for match in _PAIR.finditer(text):
        key, raw = match.group(1), match.group(2)
        try:
            values[key] = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            raise ConfigError("--run-config: expected a number, true/false or a quoted string",
                              field=key, value=raw) from None
    return values


def format_overrides(values: dict[str, Any]) -> str:
    """``{"lr": 0.01, "dataset": "/data/x", "dp": True}`` -> ``'lr=0.01 dataset="/data/x" dp=true'``: the
    ``--run-config`` text that :func:`parse_overrides` (and Flower) reads back as ``values``."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return json.dumps(v) if isinstance(v, str) else str(v)
    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def app_defaults(app: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` (what Flower starts from)."""
    try:
        return dict(tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{app / 'pyproject.toml'}: no readable [tool.flwr.app.config] ({exc})") from None


def check_run_config(app: Path, text: str | None, *, local_data: bool = True, nodes: int | None = None) -> Config:
    """The run's configuration, or a :class:`ConfigError`. With ``local_data`` (a simulation on this
    machine) a converted ``dataset`` must be an absolute path to a directory ``uirl data convert``
    wrote; in a deployment it names a directory on the silos' machines, which this one cannot check.
    With ``nodes`` (the SuperNodes the wrapper starts) ``min-nodes`` must not ask for more: the
    server would wait ``node-wait-timeout`` seconds for silos that never come."""
    cfg = from_run_config({**app_defaults(app), **parse_overrides(text)})
    if nodes is not None and cfg.federation.min_nodes > nodes:
        raise ConfigError(f"expected at most the {nodes} silos (SuperNodes) this command starts",
                          field="min-nodes", value=cfg.federation.min_nodes)
    dataset = cfg.data.dataset
    if local_data and dataset != "synthetic":
        path = Path(dataset)
        if not path.is_absolute():
            raise ConfigError("expected an absolute path (the silos do not run in this directory)",
                              field="dataset", value=dataset)
        if not (path / MANIFEST).is_file():
            raise ConfigError("expected a directory written by `uirl data convert`", field="dataset", value=dataset)
    return cfg
