"""The heartbeat role: a thread that tells the server the worker is alive,
with its running tasks' usage, progress and new output, so liveness never
depends on how long a claim or a report takes."""

import base64
import logging
import time

from ..client import BanyanError
from .holdings import attempt_of

log = logging.getLogger(__name__)

__all__ = ["Heartbeat"]

#: Seconds between looks at running tasks' progress and output, between heartbeats.
PROGRESS_CHECK = 0.5
#: Bytes of each stream a heartbeat carries of a running task's new output
#: (`banyan logs --follow`); the whole capped output goes with the report.
LIVE_OUTPUT = 16 * 1024
#: Most bytes of live output one heartbeat carries in all (tasks left out
#: go in the next one), so that many chatty tasks cannot flood the server.
LIVE_BUDGET = 512 * 1024


class Heartbeat:
    """Sends heartbeats every ``registration.heartbeat_interval`` seconds
    (sooner when a task reports progress or writes output), renews the lease
    on running tasks when the server acknowledges one, and queues the
    cancellations and "unknown" tasks it answers for the supervisor."""

    def __init__(self, client, holdings, registration, done, wake):
        self.client = client
        self.holdings = holdings
        self.registration = registration
        self.done = done  # Event: every result reported, stop
        self.wake = wake  # Event: the supervisor has something to do
        self.sent_progress = {}  # task id -> progress the last heartbeat carried
        self.sent_output = {}  # task id -> (attempt, bytes written) the last heartbeat carried

    def payload(self):
        """Running attempts, finished ones whose report is not delivered
        yet, and prefetched ones waiting for room: the server keeps an
        attempt while its worker reports it."""
        with self.holdings.lock:
            running = list(self.holdings.running.items())
            unreported = [r for r in self.holdings.unreported.values() if r["worker_id"] == self.registration.worker_id]
            waiting = [task for task, _ in self.holdings.waiting]
        tasks = {str(task["_id"]): {"attempt": attempt_of(task)} for task in waiting}
        tasks.update({r["task_id"]: {"attempt": r["attempt"], "usage": r["usage"]} for r in unreported})
        sent, sent_output = {}, {}
        before = self.sent_output
        budget = LIVE_BUDGET
        for task_id, proc in running:
            entry = {"attempt": proc.attempt, "usage": proc.usage()}
            if proc.pid is None:  # its supervisor's "started" is not taken yet: no figures, next time
                tasks[task_id] = entry
                continue
            progress = proc.read_progress()
            if progress is not None:
                entry["progress"] = progress
            written = proc.output_written()
            sent_output[task_id] = before.get(task_id)
            if any(written) and before.get(task_id) != (proc.attempt, written) and budget > 0:
                # new output since the last heartbeat: its end, for `banyan logs --follow`
                entry["output"] = {"stdout_written": written[0], "stderr_written": written[1]}
                for stream in ("stdout", "stderr"):
                    tail = proc.live_tail(stream, LIVE_OUTPUT)
                    budget -= len(tail)
                    entry["output"][stream + "_base64"] = base64.b64encode(tail).decode("ascii")
                sent_output[task_id] = (proc.attempt, written)
            tasks[task_id] = entry
            sent[task_id] = progress
        self.sent_progress, self.sent_output = sent, sent_output
        return tasks

    def progress_changed(self):
        """True when a running task reported progress, or wrote output, that
        no heartbeat has carried yet."""
        with self.holdings.lock:
            running = list(self.holdings.running.items())
        sent, output = self.sent_progress, self.sent_output
        return any(
            proc.pid is not None
            and (
                proc.read_progress() not in (None, sent.get(task_id))
                or (any(proc.output_written()) and output.get(task_id) != (proc.attempt, proc.output_written()))
            )
            for task_id, proc in running
        )

    def beat(self):
        """Send one heartbeat and queue what the server answers."""
        registration = self.registration
        wid = registration.worker_id
        if wid is None:
            return
        built = time.monotonic()
        payload = self.payload()
        sent = time.monotonic()
        try:
            reply = self.client.heartbeat(wid, payload)
        except BanyanError as exc:
            if exc.status == 404 and registration.worker_id == wid:
                registration.lost.set()
            log.warning("heartbeat failed: %s", exc)
            return
        registration.contact()
        holdings = self.holdings
        with holdings.lock:
            if registration.worker_id != wid:
                return
            holdings.control.extend(("cancel", str(t), None) for t in reply.get("cancel") or [])
            holdings.control.extend(
                ("unknown", str(t), (payload.get(str(t)) or {}).get("attempt"))
                for t in self._unknown(reply.get("unknown") or [], built, payload)
            )
            if holdings.control:
                self.wake.set()
            registration.renew(sent)

    def _unknown(self, ids, built, payload):
        """The tasks of a heartbeat's ``unknown`` that concern what we hold
        now. A prefetched one (never started) is dropped here, if the
        heartbeat (``payload``) reported that attempt: one whose earlier
        attempt's report was in flight was reported as that attempt, which
        is what the server no longer knows. A task handed back and claimed
        again meanwhile has the same attempt number (see the claim's
        ``prefetch``): what was claimed again or started after the
        heartbeat was made (at ``built``) is not what it reported. Call
        with the holdings' lock held."""
        holdings, left = self.holdings, []
        for task_id in map(str, ids):
            entry = next((e for e in holdings.waiting if str(e[0]["_id"]) == task_id), None)
            if entry is not None:
                reported = (payload.get(task_id) or {}).get("attempt")
                if entry[1] < built and reported == attempt_of(entry[0]):
                    holdings.waiting.remove(entry)  # no longer ours: never to start here
                continue
            proc = holdings.running.get(task_id)
            if proc is not None and proc.started is not None and proc.started > built:
                continue
            left.append(task_id)
        return left

    def run(self):
        """The heartbeat thread: beat until every result is reported."""
        while not self.done.is_set():
            interval = self.registration.heartbeat_interval
            started = time.monotonic()
            try:
                self.beat()
            except Exception:
                log.exception("unexpected error in heartbeat")
            # Between heartbeats, a task's new progress report goes out at
            # once (within PROGRESS_CHECK seconds): `banyan show` and the
            # API are never a whole heartbeat behind the task.
            while not self.done.wait(min(PROGRESS_CHECK, max(0.0, interval - (time.monotonic() - started)))):
                if time.monotonic() - started >= interval:
                    break
                try:
                    if self.progress_changed():
                        break
                except Exception:
                    log.exception("unexpected error reading progress")
                    break
