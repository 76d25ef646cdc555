"""waitress's thread pool with users first: workers' requests (claims,
heartbeats, reports, registrations) wait in a queue of their own and are
served by at most `worker_threads` threads at once; every other request
(a user's) is taken first by any free thread.

waitress serves requests first come, first served from one queue, so with
hundreds of workers claiming and reporting as fast as tasks end, a user's
`GET /tasks/<id>` waited behind all of them (over a second with 300
workers). Here it waits for a free thread only, and competes for the
interpreter with at most `worker_threads` busy ones.
"""

import collections
import logging
import re

from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger(__name__)

#: Requests only workers send, by method.
WORKER_REQUESTS = {
    "POST": re.compile(r"/(workers|workers/[^/]+/(claim|heartbeat)|tasks/[^/]+/finish)/?\Z"),
    "DELETE": re.compile(r"/workers/[^/]+/?\Z"),
}


def is_worker_request(method, path):
    pattern = WORKER_REQUESTS.get(method)
    return bool(pattern and pattern.match(path or ""))


class UsersFirstDispatcher(ThreadedTaskDispatcher):
    """A `ThreadedTaskDispatcher` (waitress's thread pool) whose tasks, each
    a channel with a parsed request at its head, go to one of two queues."""

    def __init__(self, threads, worker_threads):
        super().__init__()
        self.worker_queue = collections.deque()
        self.worker_threads = max(1, min(worker_threads, threads))
        self.serving_workers = 0
        self.set_thread_count(threads)

    @staticmethod
    def _is_worker(channel):
        request = channel.requests[0] if getattr(channel, "requests", None) else None
        return request is not None and is_worker_request(getattr(request, "command", None),
                                                         getattr(request, "path", None))

    def add_task(self, task):
        worker = self._is_worker(task)
        with self.lock:
            (self.worker_queue if worker else self.queue).append(task)
            self.queue_cv.notify()

    def _has_work(self):
        return bool(self.queue) or (bool(self.worker_queue) and self.serving_workers < self.worker_threads)

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
                task = self.worker_queue.popleft() if worker else self.queue.popleft()
                self.serving_workers += worker
            try:
                task.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", task)
            finally:
                if worker:
                    with self.lock:
                        self.serving_workers -= 1
                        if self.worker_queue:
                            self.queue_cv.notify()  # a thread may take the next one now

    def shutdown(self, cancel_pending=True, timeout=5):
        with self.lock:  # pending workers' requests are cancelled with the others
            self.queue.extend(self.worker_queue)
            self.worker_queue.clear()
        return super().shutdown(cancel_pending, timeout)
