"""The reporter role: a thread that delivers finished attempts, retrying
until the server has them (or says 404/409), so a result is never dropped
while the server is reachable and a slow server never stalls supervision."""

import logging
import queue

from ..client import BanyanError
from .pacing import BACKOFF_MAX, BACKOFF_START, TICK, transient

log = logging.getLogger(__name__)

__all__ = ["Reporter"]

#: Most finished attempts delivered in one request.
REPORT_BATCH = 32


class Reporter:
    """Delivers the reports the supervisor queues, in batches that ride on a
    claim for what their end frees. A report keeps its task's reservation,
    and its place in heartbeats, until it is delivered."""

    def __init__(self, client, holdings, registration, claimer, stopping, done, config=None):
        self.config = config if config is not None else claimer.config
        self.client = client
        self.holdings = holdings
        self.registration = registration
        self.claimer = claimer
        self.stopping = stopping  # Event: warm stop, no more claims
        self.done = done  # Event: stop retrying
        self.queue: queue.Queue = queue.Queue()

    def pending(self):
        """How many queued reports are not settled yet."""
        return self.queue.unfinished_tasks

    def put(self, task, attempt, outcome, stdout, stderr, usage, proc=None, reservation=None):
        """Queue the report of an ended attempt (``outcome``: an executor ``Outcome``)."""
        report = {
            "task_id": str(task["_id"]),
            "attempt": attempt,
            "outcome": outcome.outcome,
            "exit_code": outcome.exit_code,
            "stdout": stdout,
            "stderr": stderr,
            "usage": usage,
            "proc": proc,
            "reservation": reservation,
            "worker_id": self.registration.worker_id,
        }
        with self.holdings.lock:
            self.holdings.unreported[report["task_id"]] = report
        self.queue.put(report)

    def settle(self, report):
        """The report is delivered (or refused, or given up): free what the task held."""
        holdings = self.holdings
        with holdings.lock:
            if holdings.unreported.get(report["task_id"]) is report:
                del holdings.unreported[report["task_id"]]
            if report.get("reservation") is not None:
                holdings.release(report["task_id"], report["reservation"])

    def report(self, report, client=None):
        """Deliver one result; True when done with it (delivered or refused for good)."""
        task_id = report["task_id"]
        client = client or self.client
        try:
            stored = client.finish(
                task_id,
                report["attempt"],
                report["outcome"],
                report["exit_code"],
                report["stdout"],
                report["stderr"],
                report["usage"],
            )
        except BanyanError as exc:
            if transient(exc):
                log.warning("cannot report task %s yet: %s", task_id, exc)
                return False
            self.registration.contact()
            if exc.status in (404, 409):
                log.warning("report of task %s attempt %s refused (%s): dropping it", task_id, report["attempt"], exc)
            else:
                log.error("report of task %s attempt %s rejected, dropping it: %s", task_id, report["attempt"], exc)
            return True
        self.registration.contact()
        history = (stored or {}).get("history") or []
        if len(history) >= report["attempt"] and history[report["attempt"] - 1].get("late_report"):
            log.warning(
                "reported task %s attempt %s (%s) after the server had given it up: kept as the attempt's late report",
                task_id,
                report["attempt"],
                report["outcome"],
            )
        else:
            log.info(
                "reported task %s attempt %s: %s (exit code %s)",
                task_id,
                report["attempt"],
                report["outcome"],
                report["exit_code"],
            )
        return True

    def deliver(self, batch):
        """Deliver the results in ``batch`` (a list, emptied of those done
        with: delivered, or refused for good); True when none is left.

        One request: the claim endpoint takes the reports first and, unless
        the claimer has a claim under way, claims in the same request what
        their end frees, so a busy worker needs one round trip per task.
        Without a registration, each goes alone to ``/tasks/<id>/finish``."""
        registration, claimer = self.registration, self.claimer
        wid = registration.worker_id
        if wid is None:
            batch[:] = [item for item in batch if not self.report(item)]
            return not batch
        claiming = not self.stopping.is_set() and claimer.lock.acquire(blocking=False)
        try:
            free, count = (
                (self.holdings.free_after(batch), claimer.capacity()) if claiming else (self.holdings.free(), 0)
            )
            reports = [
                {
                    "task": item["task_id"],
                    "attempt": item["attempt"],
                    "outcome": item["outcome"],
                    "exit_code": item["exit_code"],
                    "stdout": item["stdout"],
                    "stderr": item["stderr"],
                    "usage": item["usage"],
                }
                for item in batch
            ]
            try:
                reply = self.client.claim(
                    wid, free, max(0, count), 0, finished=reports, **(claimer.prefetch_args(free) if claiming else {})
                )
            except BanyanError as exc:
                if transient(exc):
                    log.warning("cannot report %d task(s) yet: %s", len(batch), exc)
                    return False
                if exc.status == 404 and registration.worker_id == wid:
                    registration.lost.set()  # registration gone: the reports go one by one once reset
                    return False
                # refused whole (an odd report?): each one alone, for its own answer
                log.warning("reports of %d task(s) refused together (%s); sending each alone", len(batch), exc)
                batch[:] = [item for item in batch if not self.report(item)]
                return not batch
            registration.contact()
            claimer.take(wid, reply)
        finally:
            if claiming:
                claimer.lock.release()
        for item, result in zip(batch, reply.get("finished") or []):
            self._log_report(item, result)
        batch.clear()
        return True

    def _log_report(self, item, result):
        error = result.get("_error") if isinstance(result, dict) else None
        if not error and result.get("late_report"):
            log.warning(
                "reported task %s attempt %s (%s) after the server had given it up: kept as the attempt's late report",
                item["task_id"],
                item["attempt"],
                item["outcome"],
            )
        elif not error:
            log.info(
                "reported task %s attempt %s: %s (exit code %s)",
                item["task_id"],
                item["attempt"],
                item["outcome"],
                item["exit_code"],
            )
        elif error.get("code") in (404, 409):
            log.warning(
                "report of task %s attempt %s refused (%s): dropping it",
                item["task_id"],
                item["attempt"],
                error.get("message"),
            )
        else:
            log.error(
                "report of task %s attempt %s rejected, dropping it: %s",
                item["task_id"],
                item["attempt"],
                error.get("message"),
            )

    def hand_back(self, client=None):
        """Hand back (``release``, ``prefetched``) the tasks the supervisor
        gave up (they waited too long for room to start, or the worker
        stops): an idle worker may run them now. This worker never starts
        them. A failed hand-back is tried again next time; the server
        abandons them in the end if it never hears of it."""
        holdings, wid = self.holdings, self.registration.worker_id
        with holdings.lock:
            tasks, holdings.handing_back = holdings.handing_back, []
        if not tasks or wid is None:
            return
        try:
            released = (client or self.client).release(wid, tasks, prefetched=True)
        except BanyanError as exc:
            if transient(exc):
                with holdings.lock:
                    if self.registration.worker_id == wid:
                        holdings.handing_back.extend(tasks)
            log.warning("cannot hand back %d prefetched task(s) yet: %s", len(tasks), exc)
            return
        self.registration.contact()
        log.info(
            "handed back %d prefetched task(s) that found no room here: %s",
            len(released),
            ", ".join(str(t) for t in released),
        )

    def run(self):
        """The reporter thread: deliver until stopped and nothing is queued."""
        while True:
            try:
                self.hand_back()
            except Exception:
                log.exception("unexpected error while handing back prefetched tasks")
            try:
                item = self.queue.get(timeout=TICK)
            except queue.Empty:
                if self.done.is_set():
                    return
                continue
            taken = [item]
            while len(taken) < REPORT_BATCH:
                try:
                    taken.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            batch = list(taken)
            delay = BACKOFF_START
            try:
                while not self.deliver(batch):
                    if self.done.wait(delay):
                        log.error(
                            "giving up on the reports of task(s) %s", ", ".join(item["task_id"] for item in batch)
                        )
                        break
                    delay = min(BACKOFF_MAX, delay * 2)
                left = {id(item) for item in batch}
                for item in taken:
                    if id(item) not in left and item["proc"] is not None:
                        self.holdings.remove_attempt_dir(item["proc"], item["reservation"])
            except Exception:
                log.exception(
                    "unexpected error while reporting task(s) %s", ", ".join(item["task_id"] for item in taken)
                )
            finally:
                for item in taken:
                    self.settle(item)
                    self.queue.task_done()

    def flush(self, last_try_client=None):
        """At the very end: drop what the thread did not get to, each given
        one last try through ``last_try_client`` when one is given."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if last_try_client is not None:
                self.report(item, last_try_client)
            self.queue.task_done()
