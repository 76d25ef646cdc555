"""Requests this process holds open (long polls), each with what it waits
for; and how long a claim waited for a request thread (`queued_seconds`).

A bound on request threads, not a guard on any data: the table decides who
is woken, never what a request gets (the store's own writes decide that).
"""

import contextlib
import threading


class HeldRequests:
    """At most `limit` requests held at once, each an Event and its condition."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = {}  # Event -> what the request waits for
        #: The server is stopping: held requests are woken and none is held
        #: anew, so that they are answered before the store is closed.
        self.released = False

    def release_all(self):
        """Wake every held request and hold no more (the server stops)."""
        with self._lock:
            self.released = True
            events = list(self._waiting)
        for event in events:
            event.set()

    def __len__(self):
        with self._lock:
            return len(self._waiting)

    @contextlib.contextmanager
    def waiting(self, condition, limit):
        """An Event to wait on for `condition`; None (do not wait) when
        `limit` requests are already held, or the server is stopping."""
        event = threading.Event()
        with self._lock:
            if self.released or len(self._waiting) >= limit:
                event = None
            else:
                self._waiting[event] = condition
        try:
            yield event
        finally:
            if event is not None:
                with self._lock:
                    self._waiting.pop(event, None)


#: The request header (as waitress keys it) and WSGI environ key of the
#: seconds a claim waited for a request thread, set by `banyan server`'s
#: thread pool (banyan.server.dispatch) on every claim, over any value the
#: client sent.
QUEUED_HEADER = "X_BANYAN_QUEUED"
QUEUED_ENVIRON = "HTTP_" + QUEUED_HEADER


def queued_seconds(environ):
    """Seconds the request of `environ` waited for a request thread (0 when
    not served by `banyan server`'s thread pool)."""
    try:
        return max(0.0, float(environ.get(QUEUED_ENVIRON) or 0))
    except ValueError:
        return 0.0
