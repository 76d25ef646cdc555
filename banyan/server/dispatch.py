"""waitress's thread pool with users first: every request waits in one of
three queues, and a free thread takes, in this order,
- a user's request (anything a worker does not send);
- while fewer than `worker_threads` workers' requests run (long polls
  parked waiting for work not counted; CLAIM_MAX_WAITERS bounds those):
  a worker's heartbeat, report, registration or release, small requests
  that keep it alive and its results safe (with a lease on its tasks, a
  late heartbeat acknowledgement kills them), else a claim.

waitress serves requests first come, first served from one queue, so with
hundreds of workers claiming as fast as tasks end, a user's `GET
/tasks/<id>` waited behind all of them (over a second with 300 workers),
and so did heartbeats. Here a user's request waits for a free thread only,
and competes for the interpreter with at most `worker_threads` running
workers' requests, and its calls to the embedded store go ahead of theirs
(`users_first`: with 300 workers its p99 halved); a heartbeat waits for
one of those to end; fewer claims at once also race less for the same best
task.

A claim tells the app how long it waited in its queue (`held.queued_seconds`):
one that waited past CLAIM_MAX_QUEUED may come after its worker gave up
the request, and tasks claimed for it then would run nowhere until the
heartbeats show they were never received; the claim view answers it at
once with a `retry_after` instead (its reports are still taken).
"""

import collections
import contextlib
import logging
import re
import time

from waitress.task import ThreadedTaskDispatcher

from banyan.server.held import QUEUED_HEADER

log = logging.getLogger(__name__)

#: Requests only workers send: claims, and the small ones that keep a
#: worker alive and its results safe (heartbeats, reports, registration).
CLAIM = re.compile(r"/workers/[^/]+/claim/?\Z")
LIVENESS = {
    "POST": re.compile(r"/(workers|workers/[^/]+/(heartbeat|release)|tasks/[^/]+/finish)/?\Z"),
    "DELETE": re.compile(r"/workers/[^/]+/?\Z"),
}


def request_kind(method, path):
    """ "claim", "liveness" (a worker's other requests) or "user"."""
    path = path or ""
    if method == "POST" and CLAIM.match(path):
        return "claim"
    pattern = LIVENESS.get(method)
    return "liveness" if pattern and pattern.match(path) else "user"


class UsersFirstDispatcher(ThreadedTaskDispatcher):
    """A `ThreadedTaskDispatcher` (waitress's thread pool) whose tasks, each
    a channel with a parsed request at its head, go to one of three queues."""

    def __init__(self, threads, worker_threads, parked=lambda: 0, users_first=contextlib.nullcontext):
        """`worker_threads`: most threads running workers' requests at once,
        not counting those `parked()` says wait without running (long polls
        with nothing to claim; their number has its own bound,
        CLAIM_MAX_WAITERS). Call `wake` when one parks. `users_first()`: a
        context a user's request runs in (its store calls go first)."""
        super().__init__()
        self.worker_queue = collections.deque()  # claims
        self.liveness_queue = collections.deque()  # workers' other requests
        self.worker_threads = max(1, min(worker_threads, threads))
        self.parked = parked
        self.users_first = users_first
        self.serving_workers = 0
        #: Called first when the pool shuts down: requests held open (long
        #: polls) must end then, not after the pool's 5 s grace.
        self.on_shutdown = lambda: None
        self.set_thread_count(threads)

    def wake(self):
        """A worker's request may have room to run now."""
        with self.lock:
            if self.worker_queue or self.liveness_queue:
                self.queue_cv.notify()

    @staticmethod
    def _kind(channel):
        request = channel.requests[0] if getattr(channel, "requests", None) else None
        if request is None:
            return "user"
        return request_kind(getattr(request, "command", None), getattr(request, "path", None))

    def add_task(self, task):
        kind = self._kind(task)
        task.banyan_queued = time.monotonic()
        with self.lock:
            {"user": self.queue, "liveness": self.liveness_queue, "claim": self.worker_queue}[kind].append(task)
            self.queue_cv.notify()

    def _has_work(self):
        return bool(self.queue) or (
            (bool(self.liveness_queue) or bool(self.worker_queue))
            and self.serving_workers - self.parked() < self.worker_threads
        )

    def handler_thread(self, thread_no):
        while True:
            with self.lock:
                while not self._has_work() and self.stop_count == 0:
                    self.active_count -= 1
                    self.queue_cv.wait()
                    self.active_count += 1
                if self.stop_count > 0:
                    self.active_count -= 1
                    self.stop_count -= 1
                    self.threads.discard(thread_no)
                    self.thread_exit_cv.notify()
                    break
                worker = not self.queue
                claim = worker and not self.liveness_queue
                task = (self.queue or self.liveness_queue or self.worker_queue).popleft()
                self.serving_workers += worker
            if claim:
                task.requests[0].headers[QUEUED_HEADER] = "%.6f" % (time.monotonic() - task.banyan_queued)
            try:
                with contextlib.nullcontext() if worker else self.users_first():
                    task.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", task)
            finally:
                if worker:
                    with self.lock:
                        self.serving_workers -= 1
                        if self.worker_queue or self.liveness_queue:
                            self.queue_cv.notify()  # a thread may take the next one now

    def shutdown(self, cancel_pending=True, timeout=5):
        self.on_shutdown()
        with self.lock:  # pending workers' requests are cancelled with the others
            self.queue.extend(self.liveness_queue)
            self.queue.extend(self.worker_queue)
            self.liveness_queue.clear()
            self.worker_queue.clear()
        return super().shutdown(cancel_pending, timeout)
