"""Check a run's configuration before anything starts.

``flwr run`` reads ``--run-config`` only once the ServerApp and ClientApps are up (30-50 s later on
a small machine), drops a token without ``=`` without a word, and reports a bad value as a
traceback. The wrappers (``uirl run``, ``uirl deploy``) therefore parse the overrides the way Flower
does (space-separated ``key=value`` pairs, each value a TOML value), merge them over the app's
``[tool.flwr.app.config]`` defaults and build the :class:`~uirl.config.Config` first: a mistake is
one line naming the key, and nothing is started.
"""

from __future__ import annotations

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
        # Besides TOMLDecodeError (a ValueError): an integer of more digits than Python converts
        # (ValueError), arrays nested deeper than the parser recurses (RecursionError).
        except (ValueError, RecursionError):
            raise ConfigError("--run-config: expected a number, true/false or a quoted string",
                              field=key, value=raw) from None
    return values


def _toml_text(key: str, text: str) -> str:
    """``text`` as a TOML string that Flower's pattern (:data:`_PAIR`) reads as one value: a basic
    string (``"..."``, backslash and control characters escaped) unless it holds a double quote,
    which that pattern cannot carry even escaped; then a literal string (``'...'``: no escapes), which
    holds neither a single quote nor a control character other than tab."""
    if '"' not in text:
        escaped = "".join(f"\\u{ord(c):04x}" if (c < " " and c != "\t") or c == "\x7f" else
                          "\\\\" if c == "\\" else c for c in text)
        return f'"{escaped}"'
    if "'" not in text and not any((c < " " and c != "\t") or c == "\x7f" for c in text):
        return f"'{text}'"
    raise ConfigError("cannot be passed in --run-config: a value with a double quote may hold no single quote "
                      "and no control character", field=key, value=text)


def format_overrides(values: dict[str, Any]) -> str:
    """``{"lr": 0.01, "dataset": "/data/x", "dp": True}`` -> ``'lr=0.01 dataset="/data/x" dp=true'``: the
    ``--run-config`` text that :func:`parse_overrides` (and Flower) reads back as ``values``; a
    :class:`ConfigError` for a string no such text can carry (see :func:`_toml_text`)."""
    def value(key: str, v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return _toml_text(key, v) if isinstance(v, str) else str(v)
    return " ".join(f"{k}={value(k, v)}" for k, v in values.items())


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
