"""Workers, claims, heartbeats and results: the worker-facing endpoints.

Each endpoint is split like Eve's `patch()` / `patch_internal()`: a thin HTTP
view (role check, body parsing, rendering) over a function that does the work
and can be called from code (`register_worker`, `claim`, `heartbeat`,
`finish`, ...). The task rules themselves live in `states.TaskQueue`; the
worker registry and the output store here are plain collections with the
same discipline: every change is one single-document update whose filter
carries the state it starts from, so several server processes can share one
MongoDB.

    POST   /workers                      register (worker token)
    GET    /workers, /workers/<wid>       list, show
    DELETE /workers/<wid>                 unregister (state `stopped`)
    POST   /workers/<wid>/claim           batch claim, optional long poll
    POST   /workers/<wid>/heartbeat       liveness, usage, progress
    POST   /workers/<wid>/release         hand back claimed tasks never started
    POST   /tasks/<id>/finish             end of an attempt, with its output
    GET    /tasks/<id>/logs[?attempt=N]   an attempt's output

Long polls: a claim that finds nothing waits on an `Event` registered with
`ClaimWaiters`, which `TaskQueue.on_ready` sets when a task that fits
becomes ready in this process; it also re-checks every
`CLAIM_RECHECK_INTERVAL` seconds, since in Mongo mode another server process
may have made the task ready.
"""

import base64
import contextlib
import json
import logging
import math
import random
import re
import time
from datetime import timedelta

from bson import ObjectId
from bson.errors import InvalidId
from flask import Blueprint, abort, current_app, make_response, request
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError
from werkzeug.exceptions import HTTPException

from banyan.protocol import INT64_MAX, RESOURCES, WorkerState
from banyan.server import states
from banyan.server.held import HeldRequests
from banyan.server.auth import check_role, owner_filter
from banyan.server.identity import acts_for, current_identity
from banyan.server.refusals import refuse
from banyan.server.store import aware
from banyan.server.states import utcnow
from banyan.units import parse_size
from banyan.server.services import services

log = logging.getLogger(__name__)

WORKERS = "workers"
LOGS = "logs"


# == the functions underneath ===============================================

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


def fits(requested, free):
    return all((requested.get(key) or 0) <= free.get(key, 0) for key in RESOURCES)


class WorkerRegistry:
    """The `workers` collection: registration and liveness.

    A worker is `active` from registration until it unregisters (`stopped`)
    or stays silent past the heartbeat timeout (`lost`). Marking it lost sets
    `abandon_pending`, cleared only once its tasks were abandoned, so a
    reaper that dies half way is finished by the next one.
    """

    def __init__(self, db):
        self.workers = db[WORKERS]

    def register(self, host, resources, token_id=None):
        now = utcnow()
        doc = {"_id": ObjectId(), "host": host, "resources": resources, "state": WorkerState.ACTIVE.value,
               "registered": now, "last_heartbeat": now, "stopped": None, "token_id": token_id,
               "abandon_pending": False, "_created": now, "_updated": now}
        self.workers.insert_one(doc)
        return doc

    def get(self, worker_id):
        return self.workers.find_one({"_id": worker_id})

    def list(self, state=None, query=None):
        query = dict(query or {})
        if state:
            query = {"$and": [query, {"state": state}]} if query else {"state": state}
        return list(self.workers.find(query).sort("registered", 1))

    def touch(self, worker_id, now=None):
        """A sign of life: the worker document if it is active, else None."""
        now = now or utcnow()
        return self.workers.find_one_and_update(
            {"_id": worker_id, "state": WorkerState.ACTIVE.value},
            {"$set": {"last_heartbeat": now, "_updated": now}}, return_document=ReturnDocument.AFTER)

    def is_active(self, worker_id):
        return self.workers.find_one({"_id": worker_id, "state": WorkerState.ACTIVE.value}, {"_id": 1}) is not None

    #: Seconds an in-process count of active workers is reused.
    COUNT_TTL = 5.0

    def active_count(self):
        """How many workers are active, counted at most every COUNT_TTL
        seconds (it only sizes retry delays)."""
        now = time.monotonic()
        cached = getattr(self, "_active_count", None)
        if cached is None or now - cached[1] > self.COUNT_TTL:
            cached = (self.workers.count_documents({"state": WorkerState.ACTIVE.value}), now)
            self._active_count = cached
        return cached[0]

    def active_ids(self):
        return [d["_id"] for d in self.workers.find({"state": WorkerState.ACTIVE.value}, {"_id": 1})]

    def stop(self, worker_id):
        """Clean unregister; True if this call stopped it. Its tasks still
        need abandoning (`abandon_pending`)."""
        now = utcnow()
        return self.workers.update_one(
            {"_id": worker_id, "state": WorkerState.ACTIVE.value},
            {"$set": {"state": WorkerState.STOPPED.value, "stopped": now, "_updated": now,
                      "abandon_pending": True}}).modified_count == 1

    def mark_silent_lost(self, timeout, now=None):
        """Mark lost the active workers silent for more than `timeout`
        seconds; returns their ids. A heartbeat that lands first wins (the
        filter carries the `last_heartbeat` that was read)."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=timeout)
        lost = []
        for doc in self.workers.find({"state": WorkerState.ACTIVE.value, "last_heartbeat": {"$lt": cutoff}},
                                     {"last_heartbeat": 1}):
            result = self.workers.update_one(
                {"_id": doc["_id"], "state": WorkerState.ACTIVE.value, "last_heartbeat": doc["last_heartbeat"]},
                {"$set": {"state": WorkerState.LOST.value, "lost": now, "_updated": now, "abandon_pending": True}})
            if result.modified_count:
                log.warning("worker %s silent since %s: marked lost", doc["_id"], doc["last_heartbeat"])
                lost.append(doc["_id"])
        return lost

    def pending_abandon(self):
        return [d["_id"] for d in self.workers.find({"abandon_pending": True}, {"_id": 1})]

    def abandoned(self, worker_id):
        self.workers.update_one({"_id": worker_id, "abandon_pending": True},
                                {"$set": {"abandon_pending": False}})


def abandon_worker(registry, queue, worker_id):
    """End the attempts a worker that is gone still holds (retry rules apply)."""
    ended = queue.abandon(worker_id)
    registry.abandoned(worker_id)
    return ended


class LogStore:
    """The `logs` collection: each attempt's stdout and stderr, the last
    `cap` bytes of each. Output that is valid UTF-8 is stored as a string
    (`stdout`); any other is kept byte for byte (`stdout_bytes`)."""

    def __init__(self, db, cap):
        self.logs = db[LOGS]
        self.cap = cap

    def tail(self, output):
        """The last `cap` bytes of `output`: bytes stay bytes (exact), text
        stays text (cut at a character boundary)."""
        if isinstance(output, bytes):
            return output[-self.cap:] if len(output) > self.cap else output
        data = (output or "").encode("utf-8", errors="replace")
        if len(data) <= self.cap:
            return output or ""
        return data[len(data) - self.cap:].decode("utf-8", errors="ignore")

    @staticmethod
    def _fields(name, output):
        if isinstance(output, bytes):
            try:
                return {name: output.decode("utf-8")}
            except UnicodeDecodeError:
                return {name + "_bytes": output}
        return {name: output}

    #: Fields only live output (sent while the attempt runs) has.
    LIVE_FIELDS = ("stdout_written", "stderr_written", "live")

    def save(self, task_id, attempt, stdout, stderr):
        """Keep an attempt's output (str or bytes), as reported at its end;
        it replaces any live output. An attempt without output stores
        nothing (and reads back as empty)."""
        if not stdout and not stderr:
            return
        unset = {name: "" for name in self.LIVE_FIELDS + ("stdout_bytes", "stderr_bytes")}
        fields = dict(self._fields("stdout", self.tail(stdout)), **self._fields("stderr", self.tail(stderr)),
                      updated=utcnow(), final=True)
        for name in fields:
            unset.pop(name, None)
        self.logs.update_one({"task": task_id, "attempt": attempt}, {"$set": fields, "$unset": unset}, upsert=True)

    def save_live(self, task_id, attempt, output):
        """Output of a running attempt, from a heartbeat: the last bytes of
        each stream and how many the task has written in all (so a reader
        can tell what is new). Never overwrites the output reported at the
        attempt's end."""
        fields = {"updated": utcnow(), "live": True}
        unset = {}
        for name in ("stdout", "stderr"):
            data = output.get(name, b"")
            stored = self._fields(name, self.tail(data))
            fields.update(stored)
            other = name + "_bytes" if name in stored else name
            unset[other] = ""
            fields[name + "_written"] = output.get(name + "_written", len(data))
        try:
            self.logs.update_one({"task": task_id, "attempt": attempt, "final": {"$ne": True}},
                                 {"$set": fields, "$unset": unset}, upsert=True)
        except DuplicateKeyError:
            pass  # the attempt's end was reported meanwhile: its output stays

    def get(self, task_id, attempt=None):
        query = {"task": task_id}
        if attempt is not None:
            query["attempt"] = attempt
        docs = list(self.logs.find(query).sort("attempt", -1).limit(1))
        return docs[0] if docs else None

    @staticmethod
    def public(doc, name):
        """`{name: text}`, plus `{name}_base64` with the exact bytes when
        they are not UTF-8 (the text then has replacement characters)."""
        raw = doc.get(name + "_bytes")
        if raw is None:
            return {name: doc.get(name) or ""}
        raw = bytes(raw)
        return {name: raw.decode("utf-8", errors="replace"),
                name + "_base64": base64.b64encode(raw).decode("ascii")}


def _registry():
    return services().workers


def _queue():
    return services().queue


def _config(name):
    return current_app.config[name]


def check_worker_access(worker):
    """Admins act on any worker; a worker token only on the workers it
    registered. Aborts 403 otherwise."""
    if acts_for(current_identity(), worker):
        return
    abort(403, description="worker '%s' was registered with another token" % worker["_id"])


def _worker_or_404(worker_id):
    worker = _registry().get(worker_id)
    if worker is None:
        abort(404, description="no worker '%s'; register with POST /workers" % worker_id)
    check_worker_access(worker)
    return worker


def register_worker(host, resources):
    identity = current_identity()
    return _registry().register(host, resources, token_id=identity.token_id)


def list_workers(state=None, query=None):
    """Workers (those `query` selects), each with the tasks it holds that
    the caller may see: a user sees only their own tasks' ids there."""
    registry = _registry()
    docs = registry.list(state, query)
    held = _queue().held_by([d["_id"] for d in docs], owner_filter())
    return [public_worker(d, held.get(d["_id"], [])) for d in docs]


def get_worker(worker_id):
    doc = _registry().get(worker_id)
    if doc is None:
        abort(404, description="no worker '%s'" % worker_id)
    return public_worker(doc, _queue().held_by([worker_id], owner_filter())[worker_id])


def unregister_worker(worker_id):
    """Stop a worker; the tasks it still holds are abandoned (and retried)."""
    registry = _registry()
    _worker_or_404(worker_id)
    if registry.stop(worker_id):
        abandon_worker(registry, _queue(), worker_id)


def claim(worker_id, free, max_tasks=1, wait=0.0):
    """Claim up to `max_tasks` ready tasks that together fit `free`; with
    `wait` > 0 and nothing to claim, hold on until a fitting task becomes
    ready or `wait` seconds pass. Returns `{"_items": [...], "cancel": [...]}`,
    plus `retry_after` (seconds) when it found nothing and could not wait
    because CLAIM_MAX_WAITERS claims already do."""
    registry, queue = _registry(), _queue()
    worker = _worker_or_404(worker_id)
    if worker["state"] != WorkerState.ACTIVE or (
            not _touched_lately(worker) and registry.touch(worker_id) is None):
        abort(404, description="worker '%s' is %s; register again" % (worker_id, worker["state"]))
    wait = min(max(0.0, wait), _config("CLAIM_MAX_WAIT"))
    deadline = time.monotonic() + wait
    recheck = _config("CLAIM_RECHECK_INTERVAL")
    waiters = services().claim_waiters
    with (waiters.waiting(free, _config("CLAIM_MAX_WAITERS")) if wait > 0
          else contextlib.nullcontext()) as event:
        while True:
            if event is not None:
                event.clear()
            items = queue.claim_batch(worker_id, free, max_tasks, host=worker.get("host"))
            remaining = deadline - time.monotonic()
            if items or event is None or remaining <= 0:
                break
            waiters.park(event, min(remaining, recheck))
            if not registry.is_active(worker_id):
                # Unregistered (or marked lost) while its claim waited: a
                # task claimed now would be held by a worker that is gone.
                abort(404, description="worker '%s' is no longer active; register again" % worker_id)
    if items:
        confirm_claimer(worker_id, [(t["_id"], t["history"][-1]["attempt"]) for t in items])
        # Each attempt's own token, for the task's environment (BANYAN_TOKEN):
        # shown only in this answer, stored hashed (see auth.py).
        tokens = services().tokens.create_attempt_tokens(items)
        for task in items:
            task["attempt_token"] = tokens[task["_id"]]
    reply = {"_items": items, "cancel": queue.pending_cancellations(worker_id)}
    if not items and wait > 0 and event is None:
        reply["retry_after"] = retry_after(registry.active_count())
    return reply


def retry_after(active_workers):
    """Seconds a claim turned away from waiting (every waiting place taken)
    should let pass before the next one: long enough that all the workers
    turned away come back at about CLAIM_RETRY_RATE claims a second, at
    least 1 and at most CLAIM_MAX_WAIT, and jittered so that they do not
    come back together."""
    base = min(max(1.0, active_workers / _config("CLAIM_RETRY_RATE")), _config("CLAIM_MAX_WAIT"))
    return round(base * random.uniform(0.5, 1.5), 3)


def confirm_claimer(worker_id, claimed):
    """After a claim was written: a worker marked lost (or stopped) while it
    claimed may have had its tasks swept before this claim landed. Then the
    tasks just `claimed` ([(task id, attempt)]) go back to the queue without
    using a retry, any other it holds is abandoned, and the claim answers 404."""
    registry, queue = _registry(), _queue()
    if not registry.is_active(worker_id):
        for task_id, attempt in claimed:
            queue.give_back(task_id, worker_id, attempt)
        abandon_worker(registry, queue, worker_id)
        abort(404, description="worker '%s' was marked lost; register again" % worker_id)


def release(worker_id, claimed):
    """Hand back tasks whose claim answer reached a worker that had already
    given up `worker_id` (it registered anew meanwhile): each of `claimed`
    ([(task id, attempt)]) still held under that registration returns to
    the queue at once, without using a retry (it never ran). Returns the
    ids handed back; a task that moved on meanwhile is left alone."""
    _worker_or_404(worker_id)
    queue = _queue()
    return [task_id for task_id, attempt in claimed if queue.give_back(task_id, worker_id, attempt)]


def _touched_lately(worker):
    """A sign of life was stored less than a tenth of the heartbeat timeout
    (at most a second) ago: a claim need not write another. A busy worker
    claims after every task, and each write is a durable one."""
    last = worker.get("last_heartbeat")
    if last is None:
        return False
    return utcnow() - aware(last) < timedelta(seconds=min(1.0, _config("HEARTBEAT_TIMEOUT") / 10))


def heartbeat(worker_id, tasks):
    """Record liveness and each task's usage and progress. Returns
    `{"cancel": [ids], "unknown": [ids]}`."""
    registry, queue = _registry(), _queue()
    worker = _worker_or_404(worker_id)
    if registry.touch(worker_id) is None:
        abort(404, description="worker '%s' is %s; register again" % (worker_id, worker["state"]))
    unknown = [task_id for task_id, entry in tasks.items()
               if not queue.record_usage(task_id, worker_id, entry["attempt"], entry.get("usage"),
                                         entry.get("progress"))]
    for task_id, entry in tasks.items():
        if entry.get("output") and task_id not in unknown:
            services().logs.save_live(task_id, entry["attempt"], entry["output"])
    # Claims whose answer was lost: twice the heartbeat timeout leaves a
    # finished attempt's report, retried with backoff after an outage
    # shorter than the timeout, the time to arrive first.
    queue.abandon_unconfirmed(worker_id, set(tasks),
                              utcnow() - timedelta(seconds=2 * _config("HEARTBEAT_TIMEOUT")))
    return {"cancel": queue.pending_cancellations(worker_id), "unknown": unknown}


def finish(task_id, attempt, outcome, exit_code=None, stdout="", stderr="", usage=None):
    """A worker's report of the end of an attempt: the task as stored after
    the retry and continuation rules ran. A report of an attempt the server
    already gave up is kept in that attempt's entry (`late_report`) rather
    than refused. Output is kept once the report was accepted."""
    queue = _queue()
    task = queue.tasks.find_one({"_id": task_id}, {"worker": 1, "state": 1, "history.attempt": 1,
                                                    "history.worker": 1})
    if task is None:
        abort(404, description="no task '%s'" % task_id)
    entry = next((h for h in task.get("history") or [] if h.get("attempt") == attempt), None)
    # whose attempt it is: the worker it was given to, else (an attempt the
    # task never had) its holder, for the refusal to name
    worker_id = entry.get("worker") if entry else task.get("worker")
    if worker_id is None:
        abort(409, description="task '%s' is '%s': no worker holds it" % (task_id, task["state"]))
    if current_identity().role != "admin":
        worker = _registry().get(worker_id)
        if worker is None:
            abort(403, description="task '%s' is held by '%s', not by a registered worker" % (task_id, worker_id))
        check_worker_access(worker)
    try:
        doc = queue.finish(task_id, worker_id, attempt, outcome, exit_code, usage)
    except states.Conflict as e:
        doc = queue.keep_late_report(task_id, worker_id, attempt, outcome, exit_code, usage)
        if doc is None:
            refuse(e)  # (also inside `finish_many`, which answers each report's HTTPException)
    except states.TransitionError as e:
        refuse(e)
    services().tokens.revoke_attempt(task_id, attempt)
    services().logs.save(task_id, attempt, stdout, stderr)
    return doc


def finish_many(reports):
    """Several reports ([(task id, finish arguments)]) in one request, each
    as `finish` takes it: one result per report, in order, `{"_id": id,
    "_status": "OK"}` or, for a report refused (4xx), `"_status": "ERR"`
    with `_error` {code, message}. A refusal does not stop the others."""
    results = []
    for task_id, report in reports:
        try:
            doc = finish(task_id, **report)
        except HTTPException as e:
            if e.code is None or e.code >= 500:
                raise
            results.append({"_id": task_id, "_status": "ERR", "_error": {"code": e.code, "message": e.description}})
        else:
            results.append(dict({"_id": task_id, "_status": "OK"}, **_late(doc, report["attempt"])))
    return results


def _late(doc, attempt):
    """`{"late_report": True}` when the report of `attempt` was kept as a late one."""
    history = (doc or {}).get("history") or []
    return {"late_report": True} if len(history) >= attempt and history[attempt - 1].get("late_report") else {}


def task_logs(task_id, attempt=None):
    task = _queue().tasks.find_one(dict(owner_filter(), _id=task_id), {"history.attempt": 1})
    if task is None:
        abort(404, description="no task '%s'" % task_id)
    attempts = [h.get("attempt") for h in task.get("history") or []]
    if attempt is None:  # the latest attempt's, not the latest with output
        attempt = attempts[-1] if attempts else None
    elif attempt not in attempts:
        abort(404, description="task '%s' has no attempt %s" % (task_id, attempt))
    doc = services().logs.get(task_id, attempt) if attempt is not None else None
    if doc is None:
        return {"attempt": attempt, "stdout": "", "stderr": ""}
    answer = dict({"attempt": doc["attempt"]}, **LogStore.public(doc, "stdout"), **LogStore.public(doc, "stderr"))
    if doc.get("live"):  # sent while the attempt runs: the end of what it wrote so far
        answer.update(live=True, stdout_written=doc.get("stdout_written"), stderr_written=doc.get("stderr_written"))
    return answer


def public_worker(doc, running):
    return {"_id": doc["_id"], "host": doc.get("host"), "resources": doc.get("resources"),
            "state": doc["state"], "registered": doc.get("registered"),
            "last_heartbeat": doc.get("last_heartbeat"), "stopped": doc.get("stopped"),
            "lost": doc.get("lost"), "running": running}


# == request parsing =========================================================

class _Issues(dict):
    def refuse(self):
        if self:
            body = {"_status": "ERR", "_issues": dict(self),
                    "_error": {"code": 422, "message": "; ".join("%s: %s" % kv for kv in self.items())}}
            abort(_reply(body, 422))


def _body():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, description="send a JSON object (Content-Type: application/json)")
    return body


def _object_id(value, what):
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        abort(404, description="no %s '%s' (not an id)" % (what, value))


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unknown(body, allowed, issues, prefix=""):
    for key in set(body) - set(allowed):
        issues[prefix + key] = "unknown field"


def _resources(value, field, issues):
    """{cores, memory, gpus}: non-negative numbers (memory also '1 GiB')."""
    if not isinstance(value, dict):
        issues[field] = "must be an object {cores, memory, gpus}, not %r" % (value,)
        return None
    _unknown(value, RESOURCES, issues, field + ".")
    out = {}
    for key in RESOURCES:
        v = value.get(key, 0)
        if key == "memory" and isinstance(v, str):
            try:
                v = parse_size(v)
            except ValueError as e:
                issues[field + ".memory"] = str(e)
                continue
        if not _number(v) or v < 0:
            issues["%s.%s" % (field, key)] = "must be a number >= 0, not %r" % (v,)
        elif v > INT64_MAX:
            issues["%s.%s" % (field, key)] = "must be at most %d, not %r" % (INT64_MAX, v)
        elif key == "gpus" and v != int(v):
            issues[field + ".gpus"] = "must be a whole number, not %r" % (v,)
        else:
            out[key] = int(v) if key != "cores" or v == int(v) else v
    return out


#: Names of usage figures: stored as field names, so no `.`, `$` or NUL.
USAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def _usage(value, field, issues):
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        issues[field] = "must be an object of numbers, not %r" % (value,)
        return None
    bad = [k for k in value if not USAGE_NAME.match(k)]
    if bad:
        issues[field] = ("names must be letters, digits and '_' (up to 64, not starting with a digit), "
                         "not %r" % (bad[0],))
        return None
    for key, v in value.items():
        if v is not None and (not _number(v) or v < 0):
            issues["%s.%s" % (field, key)] = "must be a number >= 0, not %r" % (v,)
    return dict(value)


def _live_output(value, field, issues):
    """A heartbeat's output of a running attempt: `{"stdout_base64",
    "stderr_base64"` (the last bytes of each stream), `"stdout_written",
    "stderr_written"` (bytes written in all)}`, as bytes and ints; or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        issues[field] = "must be an object {stdout_base64, stderr_base64, stdout_written, stderr_written}"
        return None
    _unknown(value, ("stdout_base64", "stderr_base64", "stdout_written", "stderr_written"), issues, field + ".")
    output = {}
    for name in ("stdout", "stderr"):
        encoded = value.get(name + "_base64") or ""
        try:
            output[name] = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else None
        except (ValueError, TypeError):
            output[name] = None
        if output[name] is None:
            issues["%s.%s_base64" % (field, name)] = "must be a base64 string"
        output[name + "_written"] = _integer(value.get(name + "_written", len(output[name] or b"")),
                                             "%s.%s_written" % (field, name), issues, 0)
    return output


def _progress(value, field, issues):
    if value is None:
        return None
    if not isinstance(value, dict):
        issues[field] = "must be {fraction, message}, not %r" % (value,)
        return None
    _unknown(value, ("fraction", "message"), issues, field + ".")
    fraction, message = value.get("fraction"), value.get("message", "")
    if fraction is not None and (not _number(fraction) or not 0 <= fraction <= 1):
        issues[field + ".fraction"] = "must be a number from 0 to 1, not %r" % (fraction,)
    if message is not None and not isinstance(message, str):
        issues[field + ".message"] = "must be a string, not %r" % (message,)
    return {"fraction": fraction, "message": message[:1024] if isinstance(message, str) else ""}


def _integer(value, field, issues, low=None, high=None, default=None, nullable=False):
    if value is None and (nullable or default is not None):
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) \
            or (high is not None and value > high):
        issues[field] = "must be an integer%s%s, not %r" % (
            "" if low is None else " >= %s" % low, "" if high is None else " <= %s" % high, value)
        return None
    return value


def _output(body, name, issues, prefix=""):
    """A stream of a finish report: `name` (text) or `name_base64` (any
    bytes, base64), not both. Returns str or bytes."""
    text, encoded = body.get(name), body.get(name + "_base64")
    if text and encoded:
        issues[prefix + name] = "send %s or %s_base64, not both" % (name, name)
        return ""
    if encoded:
        if isinstance(encoded, str):
            try:
                return base64.b64decode(encoded, validate=True)
            except ValueError:  # binascii.Error
                pass
        issues[prefix + name + "_base64"] = "must be a base64 string"
        return ""
    if not isinstance(text or "", str):
        issues[prefix + name] = "must be a string"
        return ""
    return text or ""


def _render(body):
    return json.dumps(body, cls=current_app.data.json_encoder_class)


def _reply(body, status=200):
    response = make_response(_render(body), status)
    response.mimetype = "application/json"
    return response


# == the HTTP views ==========================================================

blueprint = Blueprint("claims", __name__)


@blueprint.route("/workers", methods=["POST"])
def register_view():
    check_role(("worker", "admin"))
    body, issues = _body(), _Issues()
    _unknown(body, ("host", "resources"), issues)
    host = body.get("host")
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        issues["host"] = "must be the worker's host name (1 to 255 characters), not %r" % (host,)
    resources = _resources(body.get("resources", {}), "resources", issues)
    issues.refuse()
    doc = register_worker(host, resources)
    # The worker's lease on its tasks is shorter than this (see docs/API.md).
    return _reply(dict(public_worker(doc, []), _status="OK", heartbeat_timeout=_config("HEARTBEAT_TIMEOUT")), 201)


@blueprint.route("/workers", methods=["GET"])
def list_view():
    check_role(())
    state = request.args.get("state")
    if state is not None and state not in (WorkerState.ACTIVE, WorkerState.LOST, WorkerState.STOPPED):
        abort(400, description="state must be active, lost or stopped, not %r" % state)
    items = list_workers(state, current_app.data.where_filter(WORKERS, request.args.get("where")))
    return _reply({"_items": items, "_meta": {"total": len(items)}})


@blueprint.route("/workers/<worker_id>", methods=["GET"])
def show_view(worker_id):
    check_role(())
    return _reply(get_worker(_object_id(worker_id, "worker")))


@blueprint.route("/workers/<worker_id>", methods=["DELETE"])
def unregister_view(worker_id):
    check_role(("worker", "admin"))
    unregister_worker(_object_id(worker_id, "worker"))
    return make_response("", 204)


@blueprint.route("/workers/<worker_id>/claim", methods=["POST"])
def claim_view(worker_id):
    check_role(("worker", "admin"))
    worker_id = _object_id(worker_id, "worker")
    body, issues = _body(), _Issues()
    _unknown(body, ("free", "max_tasks", "wait", "finished"), issues)
    reports = _finish_reports(body.get("finished"), issues)
    free = _resources(body.get("free"), "free", issues)
    # reporting alone (max_tasks 0) is allowed only with reports
    max_tasks = _integer(body.get("max_tasks", 1), "max_tasks", issues, 0 if reports else 1,
                         _config("CLAIM_MAX_TASKS"))
    wait = body.get("wait") or 0
    if not _number(wait) or wait < 0:
        issues["wait"] = "must be a number of seconds >= 0, not %r" % (wait,)
    issues.refuse()
    finished = finish_many(reports) if reports else None
    reply = claim(worker_id, free, max_tasks, float(wait) if max_tasks else 0.0)
    if finished is not None:
        reply["finished"] = finished
    return _reply(reply)


@blueprint.route("/workers/<worker_id>/heartbeat", methods=["POST"])
def heartbeat_view(worker_id):
    check_role(("worker", "admin"))
    worker_id = _object_id(worker_id, "worker")
    body, issues = _body(), _Issues()
    _unknown(body, ("tasks",), issues)
    reported = body.get("tasks") or {}
    tasks = {}
    if not isinstance(reported, dict):
        issues["tasks"] = "must be an object {task id: {attempt, usage, progress}}, not %r" % (reported,)
        reported = {}
    for key, entry in reported.items():
        field = "tasks.%s" % key
        try:
            task_id = ObjectId(key)
        except (InvalidId, TypeError):
            issues[field] = "'%s' is not a task id" % key
            continue
        if not isinstance(entry, dict):
            issues[field] = "must be {attempt, usage, progress}, not %r" % (entry,)
            continue
        _unknown(entry, ("attempt", "usage", "progress", "output"), issues, field + ".")
        tasks[task_id] = {"attempt": _integer(entry.get("attempt"), field + ".attempt", issues, 1),
                          "usage": _usage(entry.get("usage"), field + ".usage", issues),
                          "progress": _progress(entry.get("progress"), field + ".progress", issues),
                          "output": _live_output(entry.get("output"), field + ".output", issues)}
    issues.refuse()
    return _reply(heartbeat(worker_id, tasks))


@blueprint.route("/workers/<worker_id>/release", methods=["POST"])
def release_view(worker_id):
    check_role(("worker", "admin"))
    worker_id = _object_id(worker_id, "worker")
    body, issues = _body(), _Issues()
    _unknown(body, ("tasks",), issues)
    reported = body.get("tasks")
    claimed = []
    if not isinstance(reported, list) or not reported or len(reported) > _config("CLAIM_MAX_TASKS"):
        issues["tasks"] = "must be a list of 1 to %d {_id, attempt}, not %r" % (
            _config("CLAIM_MAX_TASKS"), reported if not isinstance(reported, list) else "%d items" % len(reported))
        reported = []
    for i, entry in enumerate(reported):
        field = "tasks.%d" % i
        if not isinstance(entry, dict):
            issues[field] = "must be {_id, attempt}, not %r" % (entry,)
            continue
        _unknown(entry, ("_id", "attempt"), issues, field + ".")
        try:
            task_id = ObjectId(entry.get("_id"))
        except (InvalidId, TypeError):
            issues[field + "._id"] = "%r is not a task id" % (entry.get("_id"),)
            continue
        attempt = _integer(entry.get("attempt"), field + ".attempt", issues, 1)
        claimed.append((task_id, attempt))
    issues.refuse()
    return _reply({"released": release(worker_id, claimed)})


@blueprint.route("/tasks/<task_id>/finish", methods=["POST"])
def finish_view(task_id):
    check_role(("worker", "admin"))
    task_id = _object_id(task_id, "task")
    body, issues = _body(), _Issues()
    report = _finish_report(body, "", issues)
    issues.refuse()
    return _reply(finish(task_id, **report))


REPORT_FIELDS = ("attempt", "outcome", "exit_code", "stdout", "stderr", "stdout_base64", "stderr_base64", "usage")


def _finish_report(body, prefix, issues):
    """The arguments of `finish` from a report's JSON (issues under `prefix`)."""
    _unknown(body, REPORT_FIELDS, issues, prefix)
    attempt = _integer(body.get("attempt"), prefix + "attempt", issues, 1)
    outcome = body.get("outcome")
    if outcome not in states.WORKER_OUTCOMES:
        issues[prefix + "outcome"] = "must be one of %s, not %r" % (", ".join(states.WORKER_OUTCOMES), outcome)
    exit_code = _integer(body.get("exit_code"), prefix + "exit_code", issues, nullable=True)
    output = {name: _output(body, name, issues, prefix) for name in ("stdout", "stderr")}
    usage = _usage(body.get("usage") or None, prefix + "usage", issues)
    return {"attempt": attempt, "outcome": outcome, "exit_code": exit_code,
            "stdout": output["stdout"], "stderr": output["stderr"], "usage": usage}


def _finish_reports(value, issues):
    """`finished` of a claim: [{"task": id, <a finish report>}, ...] -> [(task id, finish arguments)]."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _config("CLAIM_MAX_TASKS"):
        issues["finished"] = "must be a list of at most %d reports {task, attempt, outcome, ...}, not %s" % (
            _config("CLAIM_MAX_TASKS"), "%d" % len(value) if isinstance(value, list) else repr(value)[:100])
        return []
    reports = []
    for i, entry in enumerate(value):
        prefix = "finished.%d." % i
        if not isinstance(entry, dict):
            issues["finished.%d" % i] = "must be {task, attempt, outcome, ...}, not %r" % (entry,)
            continue
        task = entry.get("task")
        if not isinstance(task, str) or not ObjectId.is_valid(task):
            issues[prefix + "task"] = "'%s' is not a task id" % (task,)
            continue
        fields = {k: v for k, v in entry.items() if k != "task"}
        reports.append((ObjectId(task), _finish_report(fields, prefix, issues)))
    return reports


@blueprint.route("/tasks/<task_id>/logs", methods=["GET"])
def logs_view(task_id):
    check_role(())
    task_id = _object_id(task_id, "task")
    attempt = request.args.get("attempt")
    if attempt is not None:
        try:
            attempt = int(attempt)
        except ValueError:
            abort(400, description="attempt must be a number, not %r" % attempt)
    return _reply(task_logs(task_id, attempt))


def init_app(app, db):
    """Wire the worker endpoints into `app` (after `services(app).queue` exists)."""
    services(app).workers = WorkerRegistry(db)
    services(app).logs = LogStore(db, app.config["LOG_CAP"])
    app.register_blueprint(blueprint)
