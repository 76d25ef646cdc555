"""Claims held open (long polls) in this process, each with the resources it has free.

A claim that finds nothing waits on an `Event` registered here, which
`TaskQueue.on_ready` sets when a task that fits becomes ready in this
process; the claim also re-checks on its own, since in Mongo mode another
server process may have made the task ready.
"""

import logging

from banyan.fit import fits
from banyan.server.held import HeldRequests

log = logging.getLogger(__name__)


class ClaimWaiters(HeldRequests):
    """Claims held open in this process, each with the resources it has free.

    `notify(doc)` (the queue's `on_ready`) wakes the waiters a newly ready
    task fits. The lock only guards this in-process table: it decides who
    wakes up, never who gets a task (the claim's own update does that).
    """

    def __init__(self):
        super().__init__()
        self._parked = 0
        #: Called when a claim parks (`banyan server`'s thread pool then
        #: lets another worker's request run on a thread of its own).
        self.on_park = lambda: None

    @property
    def parked(self):
        """Claims blocked in `park` now: they hold a request thread but no CPU."""
        return self._parked

    def park(self, event, timeout):
        """Wait for `event` (at most `timeout` seconds)."""
        with self._lock:
            self._parked += 1
        self.on_park()
        try:
            return event.wait(timeout)
        finally:
            with self._lock:
                self._parked -= 1

    def waiting(self, free, limit):
        """An Event set when a fitting task becomes ready; None (do not wait)
        when `limit` claims are already waiting, so that long polls cannot
        take every request thread."""
        return super().waiting(dict(free), limit)

    def notify(self, doc):
        requested = doc.get("requested_resources") or {}
        with self._lock:
            waiting = list(self._waiting.items())
        for event, free in waiting:
            if fits(requested, free):
                event.set()
