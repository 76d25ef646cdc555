"""The reaper: a background thread that keeps the queue honest.

Every `interval` seconds it
- marks lost the workers silent past the heartbeat timeout and ends their
  running attempts as `abandoned (worker unreachable)`, through the same
  `TaskQueue.finish` a worker's failure report takes (so retries apply);
- asks the workers of tasks running past their `time_limit` to stop them
  (`pending_cancellation`, reason `timeout`);
- finishes continuation cascades that a crash interrupted.

It works on the collections alone (no request context), and every change it
makes is a single-document update with a precondition, so each of several
server processes sharing one MongoDB may run its own reaper.
"""

import logging
import threading
import time

from banyan.server.services import services
from banyan.server.states import utcnow
from banyan.server.workers import WorkerRegistry, abandon_worker

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, queue, registry, timeout, interval=None):
        self.queue = queue
        self.registry = registry
        self.timeout = float(timeout)
        self.interval = interval if interval is not None else max(0.2, min(5.0, self.timeout / 3))
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def for_app(cls, app):
        return cls(services(app).queue, services(app).workers, app.config["HEARTBEAT_TIMEOUT"])

    def run_once(self, now=None):
        """One pass; returns what it did: `{"lost": [worker ids], "abandoned":
        [task ids], "timed_out": [task ids]}`."""
        now = now or utcnow()
        lost = self.registry.mark_silent_lost(self.timeout, now)
        abandoned = []
        for worker_id in self.registry.pending_abandon():
            abandoned += [doc["_id"] for doc in abandon_worker(self.registry, self.queue, worker_id)]
        timed_out = self.queue.cancel_overdue(self.registry.active_ids(), now)
        self.queue.resume_cascades()
        return {"lost": lost, "abandoned": abandoned, "timed_out": timed_out}

    def start(self):
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="banyan-reaper", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout=10):
        """Ask the thread to stop and wait for it (up to `timeout` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                done = self.run_once()
                if any(done.values()):
                    log.info(
                        "reaper: lost workers %s, abandoned tasks %s, timed out tasks %s",
                        done["lost"],
                        done["abandoned"],
                        done["timed_out"],
                    )
            except Exception:
                log.exception("reaper pass failed; trying again in %.1fs", self.interval)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


__all__ = ["Reaper", "WorkerRegistry"]
