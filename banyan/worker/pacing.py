"""How often the worker's roles look, and how they back off from a server
that misbehaves (one place for the figures every role uses)."""

from ..client import ServerUnreachable

#: Supervision tick: how quickly exits, cancellations and deadlines are noticed.
TICK = 0.1
#: Backoff for claims, registration and reports when the server misbehaves.
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0


def transient(exc):
    """A failure worth retrying: no answer, a 5xx, a timeout or throttling answer."""
    return isinstance(exc, ServerUnreachable) or exc.status is None or exc.status >= 500 or exc.status in (408, 429)
