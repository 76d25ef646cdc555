"""A worker's standing with its server: its registration, when it last heard
from the server, and the lease on its running tasks."""

import logging
import threading
import time

from ..client import BanyanError
from .pacing import BACKOFF_MAX, BACKOFF_START

log = logging.getLogger(__name__)

__all__ = ["Registration", "lease_duration"]

#: The lease on running tasks is shorter than the server's heartbeat timeout
#: by this margin: max(LEASE_MARGIN_MIN seconds, LEASE_MARGIN_FRACTION of
#: the timeout), the time a supervisor has to kill its task's tree before the
#: server may mark the worker lost and give the task to another one.
LEASE_MARGIN_MIN, LEASE_MARGIN_FRACTION = 1.0, 0.2


def lease_duration(server_timeout):
    """How long a lease lasts, counted from the moment a heartbeat the server
    then acknowledged was sent: the server marks the worker lost no earlier
    than ``server_timeout`` after it received that heartbeat, which is later."""
    margin = max(min(LEASE_MARGIN_MIN, server_timeout / 2), LEASE_MARGIN_FRACTION * server_timeout)
    return server_timeout - margin


class Registration:
    """The worker's id on the server (None while not registered), the last
    contact with it, and the lease deadline every running task's supervisor
    holds. ``worker_id`` and the lease deadline change under the holdings'
    lock, so a claim or heartbeat answer is matched to the registration it
    was made under."""

    def __init__(self, config, client, total, holdings):
        self.config = config
        self.client = client
        self.total = total
        self.holdings = holdings
        self.worker_id = None
        # The lease on running tasks (see `lease_duration`): until the server
        # tells its heartbeat timeout, the worker's own `timeout`.
        self.lease = config.timeout
        self.heartbeat_interval = config.heartbeat
        self.lease_deadline = None  # monotonic; None before registering
        self.last_contact = time.monotonic()
        self.lost = threading.Event()  # the server forgot us (404): reset
        self.register_at = 0.0
        self.register_delay = BACKOFF_START

    def register(self):
        """Register now (errors propagate)."""
        self.worker_id = self.register_once()
        self.lost.clear()
        log.info("registered as worker %s", self.worker_id)

    def register_once(self):
        """One registration; learns the server's heartbeat timeout, which sets the lease."""
        sent = time.monotonic()
        reply = self.client.register(self.config.host, dict(self.total))
        timeout = reply.get("heartbeat_timeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            lease = min(lease_duration(float(timeout)), self.config.timeout)
            if lease != self.lease:
                self.lease = lease
                self.heartbeat_interval = min(self.config.heartbeat, lease / 3)
                log.info(
                    "server heartbeat timeout %gs: tasks are killed %.1fs after the last "
                    "acknowledged heartbeat; heartbeats every %.1fs",
                    timeout,
                    lease,
                    self.heartbeat_interval,
                )
        self.renew(sent)
        self.contact()
        return reply["_id"]

    def renew(self, sent):
        """The server heard from us after ``sent`` (monotonic): extend every running task's lease."""
        deadline = sent + self.lease
        with self.holdings.lock:
            if self.lease_deadline is not None and deadline <= self.lease_deadline:
                return
            self.lease_deadline = deadline
            running = list(self.holdings.running.values())
        for proc in running:
            proc.renew(deadline)

    def contact(self):
        """The server answered."""
        self.last_contact = time.monotonic()

    def silent_for(self, now):
        """Seconds since the server last answered."""
        return now - self.last_contact

    def given_up(self):
        """After a reset: register again from now on, with backoff."""
        self.lost.clear()
        self.register_at = time.monotonic()
        self.register_delay = BACKOFF_START

    def maybe_register_again(self, now):
        """Register again once the backoff allows; log a failure and back off more."""
        if self.worker_id is not None or now < self.register_at:
            return
        try:
            self.worker_id = self.register_once()
        except BanyanError as exc:
            log.warning("cannot register again (retrying in %.1fs): %s", self.register_delay, exc)
            self.register_at = now + self.register_delay
            self.register_delay = min(BACKOFF_MAX, self.register_delay * 2)
            return
        self.contact()
        log.info("registered again as worker %s", self.worker_id)
