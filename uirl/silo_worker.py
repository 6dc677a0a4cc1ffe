"""The silo's work, run in the calling process or in a silo worker that keeps it warm between messages.

A Flower 1.41 SuperNode starts a new ``flwr-clientapp`` process for every message. Run in that
process, a silo's work first imports torch, transformers, peft and opacus (about 8 s on a quiet
2-core machine) and rebuilds the model and the silo's data, twice a round (train, evaluate). A
**silo worker** is one long-running process per silo (``uirl silo-worker DIR``) that holds all of
that in memory: with node config ``silo-worker = "DIR"`` the ClientApp imports none of it and hands
each message's arrays to the worker, which runs the same functions of :mod:`uirl.federated` the
ClientApp would have run itself (:data:`CALLS`) and answers with their result. Nothing about the
silo's privacy changes: the ledger still travels in and out of each call exactly as in-process, and
is written to the silo's ``ledger-path`` by whichever process runs the call, before the reply leaves.

Security: the worker listens on a Unix socket ``DIR/socket`` in a directory only its owner may use
(mode 0700, checked), and every connection must prove it holds the 32 random bytes of
``DIR/authkey`` (mode 0600, new at every start) in :mod:`multiprocessing.connection`'s HMAC
challenge before anything it sends is unpickled.

Protocol (one call per connection): the caller sends ``(PROTOCOL, uirl version, call name, args,
kwargs)``; the worker answers with any number of ``("say", line)`` (the silo's progress, which the
ClientApp prints so that Flower forwards it to the run's log), then ``("ok", result)`` or
``("raised", class name, text)``. A worker of another protocol or uirl version refuses the call.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path
from typing import Any

from uirl import __version__
from uirl.errors import ConfigError, EvaluationWithheld, UirlError

#: Node config key naming the directory of the silo's worker.
NODE_CONFIG_KEY = "silo-worker"
PROTOCOL = 1
SOCKET, AUTHKEY = "socket", "authkey"
#: Longest Unix socket path Linux takes (108 bytes with the terminating zero).
_MAX_SOCKET_PATH = 107


def _federated(name: str) -> Callable[..., Any]:
    from uirl import federated  # torch and the model code: only where the work runs

    return getattr(federated, name)


#: What a silo worker runs: call name -> (function in :mod:`uirl.federated`, takes ``say=``).
CALLS = {
    "release": ("local_release_durable", False),
    "train": ("local_train_durable", True),
    "evaluate": ("evaluate_received", False),
    "catalogue-size": ("catalogue_size", False),
}
#: Exceptions a caller gets back as themselves (the ClientApp catches them by class); any other
#: failure comes back as :class:`SiloWorkerError` under the original class's name.
_KNOWN = {cls.__name__: cls for cls in (EvaluationWithheld,)}


class SiloWorkerError(UirlError):
    """The silo worker could not be used, or the call failed inside it."""


def worker_dir(node_config) -> Path | None:
    """The silo worker's directory named by the node config (``silo-worker``), or None to work in-process."""
    value = node_config.get(NODE_CONFIG_KEY)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ConfigError("expected the path of a silo worker's directory (uirl silo-worker DIR)",
                          field=NODE_CONFIG_KEY, value=value)
    return Path(value)


def run_call(directory: Path | None, name: str, *args, say: Callable[[str], None] | None = None, **kwargs):
    """Run the silo call ``name`` (:data:`CALLS`) here (``directory`` None) or in the silo worker
    listening in ``directory``; ``say`` receives the silo's progress lines."""
    function, says = CALLS[name]
    if directory is None:
        return _federated(function)(*args, **({"say": say} if says else {}), **kwargs)
    return _remote(directory, name, args, kwargs, say or (lambda line: None))


def _socket_path(directory: Path) -> Path:
    path = Path(directory).resolve() / SOCKET
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise SiloWorkerError(f"silo worker directory {directory}: its socket path {path} is longer than the "
                              f"{_MAX_SOCKET_PATH} bytes a Unix socket allows; choose a shorter directory")
    return path


def _remote(directory: Path, name: str, args: tuple, kwargs: dict, say: Callable[[str], None]):
    where = f"the silo worker in {directory}"
    start_hint = f"start it with `uirl silo-worker {directory}`"
    try:
        key = (Path(directory) / AUTHKEY).read_bytes()
    except FileNotFoundError:
        raise SiloWorkerError(f"no silo worker runs in {directory} (node config {NODE_CONFIG_KEY}): {start_hint}"
                              ) from None
    except OSError as exc:
        raise SiloWorkerError(f"cannot read {Path(directory) / AUTHKEY} ({exc.strerror}): run the ClientApp as the "
                              "silo worker's user") from None
    try:
        conn = Client(str(_socket_path(directory)), family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError):
        raise SiloWorkerError(f"{where} is not running (its socket is gone or refuses): {start_hint}") from None
    except (AuthenticationError, EOFError, ConnectionResetError):
        raise SiloWorkerError(f"{where} refused this caller's key (did it restart while the key was read? "
                              "try again)") from None
    except OSError as exc:
        raise SiloWorkerError(f"{where} cannot be reached ({exc.strerror or type(exc).__name__})") from None
    with conn:
        conn.send((PROTOCOL, __version__, name, args, kwargs))
        while True:
            try:
                kind, *rest = conn.recv()
            except (EOFError, ConnectionResetError):
                raise SiloWorkerError(f"{where} closed the connection during the {name!r} call "
                                      "(it stopped or crashed: see its log)") from None
            if kind == "say":
                say(rest[0])
            elif kind == "ok":
                return rest[0]
            elif kind == "refused":
                raise SiloWorkerError(f"{where} refused the call: {rest[0]}")
            elif kind == "raised":
                cls_name, text = rest
                if cls_name in _KNOWN:
                    raise _KNOWN[cls_name](text)
                # The same class name as in-process, so the server's record of a failure reads the same.
                raise type(cls_name, (SiloWorkerError,), {})(f"{text} (raised in {where}; traceback in its log)")
            else:
                raise SiloWorkerError(f"{where} answered with an unknown message {kind!r}")


# --- the worker -----------------------------------------------------------------------------------

def prepare_directory(directory: Path) -> bytes:
    """Create ``directory`` (mode 0700) if needed, refuse one that others may use, and write a new
    authkey (mode 0600). Returns the key."""
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise SiloWorkerError(f"silo worker directory {directory}: cannot create it ({exc.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SiloWorkerError(f"silo worker directory {directory}: not a directory")
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise SiloWorkerError(f"silo worker directory {directory}: must belong to this user with no access "
                              f"for group or others (mode {stat.S_IMODE(info.st_mode):o}; chmod 700 it)")
    key = secrets.token_bytes(32)
    tmp = directory / f".{AUTHKEY}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    os.replace(tmp, directory / AUTHKEY)
    return key


def _claim_socket(path: Path) -> None:
    """Remove a stale socket file left by a worker that died; refuse if a worker still listens there."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SiloWorkerError(f"a silo worker already listens on {path}")


def _answer(conn: Connection, log: Callable[[str], None]) -> None:
    try:
        protocol, version, name, args, kwargs = conn.recv()
    except Exception as exc:  # an authenticated caller sent something else: tell the log, serve on
        log(f"a caller sent no call it could read ({type(exc).__name__}); ignored")
        return
    if protocol != PROTOCOL or version != __version__:
        conn.send(("refused", f"the worker runs uirl {__version__} (protocol {PROTOCOL}), the caller "
                              f"{version} (protocol {protocol}): restart the worker with the caller's uirl"))
        return
    if name not in CALLS:
        conn.send(("refused", f"unknown call {name!r}"))
        return
    function, says = CALLS[name]
    started = time.perf_counter()
    try:
        result = _federated(function)(*args, **({"say": lambda line: conn.send(("say", line))} if says else {}),
                                      **kwargs)
    except Exception as exc:  # sent back by class name and text; the traceback stays in this log
        log(f"{name} failed:\n{traceback.format_exc()}")
        conn.send(("raised", type(exc).__name__, str(exc)))
        return
    conn.send(("ok", result))
    log(f"{name} answered in {time.perf_counter() - started:.2f} s")


def serve(directory: Path, *, log: Callable[[str], None] | None = None) -> None:
    """Answer silo calls on ``directory``'s socket, one connection at a time, until stopped (SIGTERM or
    SIGINT end it cleanly; the socket file is removed)."""
    log = log or (lambda line: print(f"{time.strftime('%H:%M:%S')} uirl silo worker: {line}", flush=True))
    key = prepare_directory(directory)
    path = _socket_path(directory)
    _claim_socket(path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Listener(str(path), family="AF_UNIX", authkey=key) as listener:
        log(f"listening on {path} (pid {os.getpid()}, uirl {__version__})")
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, ConnectionResetError) as exc:
                log(f"refused a connection that did not prove the key ({type(exc).__name__})")
                continue
            with conn:
                try:
                    _answer(conn, log)
                except (BrokenPipeError, ConnectionResetError):  # the ClientApp was stopped mid-call
                    log("the caller left before the answer")
