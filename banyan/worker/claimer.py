"""The claimer role: a thread that long-polls the server for tasks that fit
what is free, and hands them to the supervisor."""

import logging
import threading
import time

from ..client import BanyanError
from .pacing import BACKOFF_MAX, BACKOFF_START, TICK

log = logging.getLogger(__name__)

__all__ = ["Claimer"]

#: Longest a claim is held open while tasks are running: their resources may
#: come back during the poll, and the request carries the old free amounts.
#: With no core free the claimer does not poll at all; it waits for a task to
#: end, probing (without waiting) this often for tasks that need no core.
BUSY_CLAIM_WAIT = 2.0
#: Longest pause a server's ``retry_after`` may impose on the claimer.
RETRY_AFTER_MAX = 60.0


class Claimer:
    """Claims tasks into the holdings' inbox and wakes the supervisor.

    The claimer sleeps on ``holdings.released`` while every core is taken: a
    claim then could only return zero-core tasks, and a long poll would carry
    stale free amounts after a task ends. ``lock`` makes one claim at a time
    (this one's, or the one a report carries, see ``Reporter.deliver``): each
    is sized by what is free, and two at once would both count the same free
    cores."""

    def __init__(self, config, client, holdings, registration, stopping, wake):
        self.config = config
        self.client = client
        self.holdings = holdings
        self.registration = registration
        self.stopping = stopping  # Event: warm stop, no more claims
        self.wake = wake  # Event: the supervisor has something to do
        self.lock = threading.Lock()
        self.retry_after = None  # the server's hint when it could not hold a claim open

    def capacity(self):
        """How many tasks to ask for now."""
        if self.config.max_tasks is None:
            return self.config.claim_batch
        return min(self.config.claim_batch, self.config.max_tasks - self.holdings.held())

    def claim_once(self, wait=None, free=None):
        """One claim request; returns how many tasks arrived. Raises the client's errors.

        ``wait`` (long-poll seconds) defaults to ``claim_wait``, capped at
        ``BUSY_CLAIM_WAIT`` while tasks are running.
        """
        wid = self.registration.worker_id
        count = self.capacity()
        if wid is None or count <= 0:
            return 0
        if wait is None:
            busy = self.holdings.busy()
            wait = min(self.config.claim_wait, BUSY_CLAIM_WAIT) if busy else self.config.claim_wait
        free = self.holdings.free() if free is None else free
        try:
            reply = self.client.claim(wid, free, count, wait, **self.prefetch_args(free))
        except BanyanError as exc:
            exc.worker_id = wid  # type: ignore[attr-defined]  # the registration it was refused for
            raise
        self.registration.contact()
        return self.take(wid, reply)

    def prefetch_args(self, free):
        """The claim's ``prefetch`` argument, when there is one (see ``prefetch``)."""
        count = self.prefetch(free)
        return {"prefetch": count} if count else {}

    def prefetch(self, free):
        """How many tasks a claim offering ``free`` may prefetch: none while
        stopping, nor when no core is free (a probe for tasks of no core,
        while every core is busy: what it prefetched would only wait)."""
        if self.stopping.is_set() or free["cores"] <= 0:
            return 0
        return self.holdings.prefetch_room(self.config.prefetch)

    def take(self, wid, reply):
        """Queue the tasks a claim answer brought (and note its
        cancellations); returns how many."""
        items = reply.get("_items") or []
        retry_after = reply.get("retry_after")
        self.retry_after = (
            min(float(retry_after), RETRY_AFTER_MAX)
            if isinstance(retry_after, (int, float)) and retry_after > 0
            else None
        )
        holdings = self.holdings
        with holdings.lock:
            stale = self.registration.worker_id != wid  # reset while the claim was in flight
            if not stale:
                for task in items:
                    holdings.claimed(task)
                holdings.control.extend(("cancel", str(t), None) for t in reply.get("cancel") or [])
        if stale:
            if items:
                self.hand_back(wid, items)
            return 0
        if items or reply.get("cancel"):
            self.wake.set()
        if items:
            log.info("claimed %d task(s): %s", len(items), ", ".join(str(t["_id"]) for t in items))
        return len(items)

    def hand_back(self, wid, items):
        """Tasks claimed under registration ``wid``, which this worker gave
        up while the claim was in flight: they go back to the queue at once
        (no retry used), rather than wait to be abandoned as unconfirmed."""
        ids = ", ".join(str(t["_id"]) for t in items)
        try:
            released = self.client.release(wid, items)
        except BanyanError as exc:
            log.warning(
                "cannot hand back %d task(s) claimed by the previous registration %s (%s); the "
                "server abandons them later: %s",
                len(items),
                wid,
                exc,
                ids,
            )
            return
        log.warning(
            "handed back %d of %d task(s) claimed by the previous registration %s: %s",
            len(released),
            len(items),
            wid,
            ids,
        )

    def next_claim(self):
        """``(wait, free)`` for the next claim, or None to wait for resources to come back first."""
        free = self.holdings.free()
        if not self.holdings.busy():
            return self.config.claim_wait, free
        if free["cores"] <= 0:
            return None
        return min(self.config.claim_wait, BUSY_CLAIM_WAIT), free

    def planned_claim(self, probe=False):
        """``(plan, tasks claimed)``: a claim as ``next_claim`` plans it (or,
        for a ``probe``, one that does not wait), sized and sent under the
        claim lock; no request when the plan is None."""
        with self.lock:
            plan = (0, self.holdings.free()) if probe else self.next_claim()
            return plan, (self.claim_once(*plan) if plan is not None else 0)

    def run(self):
        """The claimer thread: claim until the worker stops."""
        released = self.holdings.released
        delay = BACKOFF_START
        idle = TICK
        while not self.stopping.is_set():
            released.clear()
            if self.registration.worker_id is None or self.capacity() <= 0:
                released.wait(TICK)
                continue
            started = time.monotonic()
            try:
                plan, got = self.planned_claim()
                if plan is None:
                    # Every core is taken: wait for one to come back, probing now
                    # and then (without waiting) for tasks that need no core.
                    if released.wait(BUSY_CLAIM_WAIT) or self.stopping.is_set():
                        continue
                    started = time.monotonic()
                    plan, got = self.planned_claim(probe=True)
            except BanyanError as exc:
                if self.stopping.is_set():
                    break  # unregistered while the claim waited: the server let go of it
                if exc.status == 404 and getattr(exc, "worker_id", None) == self.registration.worker_id:
                    self.registration.lost.set()
                log.warning("claim failed (retrying in %.1fs): %s", delay, exc)
                self.stopping.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            except Exception:
                log.exception("unexpected error while claiming")
                self.stopping.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            delay = BACKOFF_START
            if got:
                idle = TICK
            elif self.retry_after:
                # Every waiting place on the server was taken: come back
                # when it says, so hundreds of idle workers do not spin.
                self.stopping.wait(self.retry_after)
            elif plan[0] and time.monotonic() - started < 0.5 * plan[0]:
                # The server did not hold the request (or we had nothing
                # that fits): back off a little, as Huey's idle delay does.
                self.stopping.wait(idle)
                idle = min(2.0, idle * 2)
