"""What leaves the silo when its ClientApp fails: the exception's class name, nothing more.

Left to itself, Flower answers a message whose handler raised with an error reply whose reason is
the exception's text (and, in places, its traceback). That text is written for whoever debugs the
silo: it can hold local paths, file lines, user ids or data values, and the server records it. The
mod :func:`contain_failures` (the outermost of the ClientApp's mods, so it also covers SecAgg+'s)
catches any exception, logs the whole traceback on the silo's own console (a SuperNode's log in a
deployment), and replies with an error that names only the exception's class. The server records
such a reply as rejected (``the ClientApp failed: ValueError (details in the silo's log)``).
"""

from __future__ import annotations

import traceback
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

#: What the server learns of a failure besides the exception's class name.
DETAILS_STAY = "(details in the silo's log)"


def failure_reason(exc: BaseException) -> str:
    """The error reason the server receives for ``exc``: its class name only."""
    return f"{type(exc).__name__} {DETAILS_STAY}"


def contain_failures(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the rest of the ClientApp; if it raises, log the traceback here and reply with the class name only."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # any failure: its text must not leave the silo
        log(ERROR, "uirl: the ClientApp failed on a %s message; the server is told only '%s':\n%s",
            msg.metadata.message_type, failure_reason(exc), traceback.format_exc())
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=failure_reason(exc)), reply_to=msg)
