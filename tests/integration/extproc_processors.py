"""User processors for the external-processing tests, loaded by xdsd as
``tests.integration.extproc_processors:<name>`` (xdsd runs from the repository root)."""

from __future__ import annotations

import os
import time

from xdsd.processing import Message, Mutate, Respond, Result


def shout(message: Message) -> Result:
    """Copies ``x-word`` upper-cased to ``x-shouted``; ``args.greeting`` goes to ``x-greeting``."""
    return Mutate(set={"x-shouted": message.headers.get("x-word", "").upper(),
                       "x-greeting": str(message.args.get("greeting", ""))})


def boom(message: Message) -> Result:
    raise RuntimeError("this processor always fails")


def slow(message: Message) -> Result:
    """Busy for 2 s in Python (interruptible), far longer than the tests' timeouts."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        sum(range(1000))
    return Respond(418, "should never be seen\n")


def caller(message: Message) -> Result:
    """The caller's SPIFFE ID as the upstream sees it (x-caller)."""
    return Mutate(set={"x-caller": message.caller or "none"})


USER_CONSTANT = "not a processor"


class NotAProcessor:
    """A class that does not subclass xdsd.processing.Processor (refused by the loader)."""


def sleepy(message: Message) -> Result:
    """Blocks in a C call (time.sleep) for 5 s."""
    time.sleep(5)
    return Respond(418, "should never be seen\n")


def die(message: Message) -> Result:
    """Ends the process it runs in (only ever run in a worker process)."""
    os._exit(3)
