"""Requests this process holds open (long polls), each with what it waits for.

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

    def __len__(self):
        with self._lock:
            return len(self._waiting)

    @contextlib.contextmanager
    def waiting(self, condition, limit):
        """An Event to wait on for `condition`; None (do not wait) when
        `limit` requests are already held."""
        event = threading.Event()
        with self._lock:
            if len(self._waiting) >= limit:
                event = None
            else:
                self._waiting[event] = condition
        try:
            yield event
        finally:
            if event is not None:
                with self._lock:
                    self._waiting.pop(event, None)
