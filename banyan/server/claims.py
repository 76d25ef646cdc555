"""Workers, claims, heartbeats and results: the worker-facing endpoints.

Each endpoint is split like Eve's `patch()` / `patch_internal()`: a thin HTTP
view (role check, body parsing, rendering) over a function that does the work
and can be called from code (`register_worker`, `claim`, `heartbeat`,
`finish`, ...). The task rules live in `states.TaskQueue`, the worker
registry and its states in `workers`, the output store in `logstore`, the
held claims in `claim_waiters` and the parsing of these requests' bodies in
`worker_requests`; this module holds the functions and views on top.

    POST   /workers                      register (worker token)
    GET    /workers, /workers/<wid>       list, show
    DELETE /workers/<wid>                 unregister (state `stopped`)
    POST   /workers/<wid>/claim           batch claim, optional long poll
    POST   /workers/<wid>/heartbeat       liveness, usage, progress
    POST   /workers/<wid>/release         hand back claimed tasks never started
    POST   /tasks/<id>/finish             end of an attempt, with its output
    GET    /tasks/<id>/logs[?attempt=N]   an attempt's output

Long polls: a claim that finds nothing waits on an `Event` registered with
`claim_waiters.ClaimWaiters`, which `TaskQueue.on_ready` sets when a task that fits
becomes ready in this process; it also re-checks every
`CLAIM_RECHECK_INTERVAL` seconds, since in Mongo mode another server process
may have made the task ready (on FerretDB 1.x, where the claims of a process
share one read of the ready tasks, a re-check sees such a task once that read
is past its interval: `ready_candidates`, 5 s at most).
"""

import contextlib
import logging
import random
import time
from datetime import timedelta

from bson import ObjectId
from bson.errors import InvalidId
from flask import Blueprint, abort, current_app, g, make_response, request
from werkzeug.exceptions import HTTPException

from banyan.protocol import WorkerState
from banyan.server import states
from banyan.server import worker_requests as req
from banyan.server.auth import check_role, owner_filter
from banyan.server.held import queued_seconds
from banyan.server.identity import acts_for, current_identity
from banyan.server.logstore import LogStore
from banyan.server.refusals import refuse
from banyan.server.services import services
from banyan.server.states import utcnow
from banyan.server.store import NUL_REFUSED, aware, nul_path
from banyan.server.workers import WORKERS, WorkerRegistry, abandon_worker

log = logging.getLogger(__name__)


# == the functions underneath ===============================================


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


def _worker(worker_id):
    """The registered worker `worker_id` (None if unknown), read once per
    request: a claim carrying reports checks its worker for each report and
    again for the claim, all within microseconds (a state change racing the
    claim is `confirm_claimer`'s, which reads afresh)."""
    read = g.setdefault("banyan_workers", {})
    if worker_id not in read:
        read[worker_id] = _registry().get(worker_id)
    return read[worker_id]


def _worker_or_404(worker_id):
    worker = _worker(worker_id)
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


def claim(worker_id, free, max_tasks=1, wait=0.0, prefetch=0):
    """Claim up to `max_tasks` ready tasks that together fit `free`; with
    `wait` > 0 and nothing to claim, hold on until a fitting task becomes
    ready or `wait` seconds pass. Then up to `prefetch` more, each within the
    worker's registered resources: it holds them until a slot frees,
    with no round trip between two tasks, and hands back (`release` with
    `prefetched`) those it could not start soon. Returns `{"_items": [...],
    "cancel": [...]}`, plus `retry_after` (seconds) when it found nothing and
    could not wait because CLAIM_MAX_WAITERS claims already do."""
    registry, queue = _registry(), _queue()
    worker = _worker_or_404(worker_id)
    if worker["state"] != WorkerState.ACTIVE or (not _touched_lately(worker) and registry.touch(worker_id) is None):
        abort(404, description="worker '%s' is %s; register again" % (worker_id, worker["state"]))
    wait = min(max(0.0, wait), _config("CLAIM_MAX_WAIT"))
    deadline = time.monotonic() + wait
    recheck = _config("CLAIM_RECHECK_INTERVAL")
    waiters = services().claim_waiters
    with waiters.waiting(free, _config("CLAIM_MAX_WAITERS")) if wait > 0 else contextlib.nullcontext() as event:
        while True:
            if event is not None:
                event.clear()
            items = queue.claim_batch(worker_id, free, max_tasks, host=worker.get("host"))
            remaining = deadline - time.monotonic()
            if items or event is None or remaining <= 0:
                break
            waiters.park(event, min(remaining, recheck))
            if waiters.released:
                event = None  # the server stops: answered as a claim turned away, claiming nothing
                break
            if not registry.is_active(worker_id):
                # Unregistered (or marked lost) while its claim waited: a
                # task claimed now would be held by a worker that is gone.
                abort(404, description="worker '%s' is no longer active; register again" % worker_id)
    if prefetch > 0 and not waiters.released:
        items += queue.claim_batch(
            worker_id, {}, prefetch, host=worker.get("host"), each=dict(worker.get("resources") or {})
        )
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


def release(worker_id, claimed, prefetched=False):
    """Hand back tasks whose claim answer reached a worker that had already
    given up `worker_id` (it registered anew meanwhile): each of `claimed`
    ([(task id, attempt)]) still held under that registration returns to
    the queue at once, without using a retry (it never ran). Returns the
    ids handed back; a task that moved on meanwhile is left alone.
    `prefetched`: tasks a worker prefetched and will not start (another
    worker may run them now): their attempt is erased, not kept as
    abandoned, and its token revoked."""
    _worker_or_404(worker_id)
    queue = _queue()
    released = [
        task_id for task_id, attempt in claimed if queue.give_back(task_id, worker_id, attempt, erase=prefetched)
    ]
    if prefetched:
        for task_id, attempt in claimed:
            if task_id in released:
                services().tokens.revoke_attempt(task_id, attempt)
    return released


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
    unknown = [
        task_id
        for task_id, entry in tasks.items()
        if not queue.record_usage(task_id, worker_id, entry["attempt"], entry.get("usage"), entry.get("progress"))
    ]
    for task_id, entry in tasks.items():
        if entry.get("output") and task_id not in unknown:
            services().logs.save_live(task_id, entry["attempt"], entry["output"])
    # Claims whose answer was lost: twice the heartbeat timeout leaves a
    # finished attempt's report, retried with backoff after an outage
    # shorter than the timeout, the time to arrive first.
    queue.abandon_unconfirmed(worker_id, set(tasks), utcnow() - timedelta(seconds=2 * _config("HEARTBEAT_TIMEOUT")))
    return {"cancel": queue.pending_cancellations(worker_id), "unknown": unknown}


def finish(task_id, attempt, outcome, exit_code=None, stdout="", stderr="", usage=None):
    """A worker's report of the end of an attempt: the task as stored after
    the retry and continuation rules ran. A report of an attempt the server
    already gave up is kept in that attempt's entry (`late_report`) rather
    than refused. Output is kept once the report was accepted."""
    queue = _queue()
    task = queue.tasks.find_one({"_id": task_id})  # whole: `finish` decides on it without reading it again
    if task is None:
        abort(404, description="no task '%s'" % task_id)
    entry = next((h for h in task.get("history") or [] if h.get("attempt") == attempt), None)
    # whose attempt it is: the worker it was given to, else (an attempt the
    # task never had) its holder, for the refusal to name
    worker_id = entry.get("worker") if entry else task.get("worker")
    if worker_id is None:
        abort(409, description="task '%s' is '%s': no worker holds it" % (task_id, task["state"]))
    if current_identity().role != "admin":
        worker = _worker(worker_id)
        if worker is None:
            abort(403, description="task '%s' is held by '%s', not by a registered worker" % (task_id, worker_id))
        check_worker_access(worker)
    try:
        doc = queue.finish(task_id, worker_id, attempt, outcome, exit_code, usage, doc=task)
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
    return {
        "_id": doc["_id"],
        "host": doc.get("host"),
        "resources": doc.get("resources"),
        "state": doc["state"],
        "registered": doc.get("registered"),
        "last_heartbeat": doc.get("last_heartbeat"),
        "stopped": doc.get("stopped"),
        "lost": doc.get("lost"),
        "running": running,
    }


# == the HTTP views ==========================================================

blueprint = Blueprint("claims", __name__)


@blueprint.route("/workers", methods=["POST"])
def register_view():
    check_role(("worker", "admin"))
    body, issues = req.json_body(), req.Issues()
    req.check_unknown(body, ("host", "resources"), issues)
    host = body.get("host")
    if not isinstance(host, str) or not 0 < len(host) <= 255:
        issues["host"] = "must be the worker's host name (1 to 255 characters), not %r" % (host,)
    elif nul_path(host) is not None:
        issues["host"] = NUL_REFUSED
    resources = req.parse_resources(body.get("resources", {}), "resources", issues)
    issues.refuse()
    doc = register_worker(host, resources)
    # The worker's lease on its tasks is shorter than this (see docs/API.md).
    return req.reply(dict(public_worker(doc, []), _status="OK", heartbeat_timeout=_config("HEARTBEAT_TIMEOUT")), 201)


@blueprint.route("/workers", methods=["GET"])
def list_view():
    check_role(())
    state = request.args.get("state")
    if state is not None and state not in (WorkerState.ACTIVE, WorkerState.LOST, WorkerState.STOPPED):
        abort(400, description="state must be active, lost or stopped, not %r" % state)
    items = list_workers(state, current_app.data.where_filter(WORKERS, request.args.get("where")))
    return req.reply({"_items": items, "_meta": {"total": len(items)}})


@blueprint.route("/workers/<worker_id>", methods=["GET"])
def show_view(worker_id):
    check_role(())
    return req.reply(get_worker(req.parse_object_id(worker_id, "worker")))


@blueprint.route("/workers/<worker_id>", methods=["DELETE"])
def unregister_view(worker_id):
    check_role(("worker", "admin"))
    unregister_worker(req.parse_object_id(worker_id, "worker"))
    return make_response("", 204)


@blueprint.route("/workers/<worker_id>/claim", methods=["POST"])
def claim_view(worker_id):
    check_role(("worker", "admin"))
    worker_id = req.parse_object_id(worker_id, "worker")
    body, issues = req.json_body(), req.Issues()
    req.check_unknown(body, ("free", "max_tasks", "wait", "finished", "prefetch"), issues)
    reports = req.parse_finish_reports(body.get("finished"), issues)
    free = req.parse_resources(body.get("free"), "free", issues)
    # reporting alone (max_tasks 0) is allowed only with reports
    max_tasks = req.parse_integer(
        body.get("max_tasks", 1), "max_tasks", issues, 0 if reports else 1, _config("CLAIM_MAX_TASKS")
    )
    prefetch = req.parse_integer(body.get("prefetch", 0), "prefetch", issues, 0, _config("CLAIM_MAX_TASKS"))
    wait = body.get("wait") or 0
    if not req.is_number(wait) or wait < 0:
        issues["wait"] = "must be a number of seconds >= 0, not %r" % (wait,)
    issues.refuse()
    finished = finish_many(reports) if reports else None
    if max_tasks and queued_seconds(request.environ) > _config("CLAIM_MAX_QUEUED"):
        # its worker may have given it up: claim nothing, come back later
        reply = claim(worker_id, free, 0, 0.0)
        reply["retry_after"] = retry_after(_registry().active_count())
    else:
        reply = claim(worker_id, free, max_tasks, float(wait) if max_tasks else 0.0, prefetch or 0)
    if finished is not None:
        reply["finished"] = finished
    return req.reply(reply)


@blueprint.route("/workers/<worker_id>/heartbeat", methods=["POST"])
def heartbeat_view(worker_id):
    check_role(("worker", "admin"))
    worker_id = req.parse_object_id(worker_id, "worker")
    body, issues = req.json_body(), req.Issues()
    req.check_unknown(body, ("tasks",), issues)
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
        req.check_unknown(entry, ("attempt", "usage", "progress", "output"), issues, field + ".")
        tasks[task_id] = {
            "attempt": req.parse_integer(entry.get("attempt"), field + ".attempt", issues, 1),
            "usage": req.parse_usage(entry.get("usage"), field + ".usage", issues),
            "progress": req.parse_progress(entry.get("progress"), field + ".progress", issues),
            "output": req.parse_live_output(entry.get("output"), field + ".output", issues),
        }
    issues.refuse()
    return req.reply(heartbeat(worker_id, tasks))


@blueprint.route("/workers/<worker_id>/release", methods=["POST"])
def release_view(worker_id):
    check_role(("worker", "admin"))
    worker_id = req.parse_object_id(worker_id, "worker")
    body, issues = req.json_body(), req.Issues()
    req.check_unknown(body, ("tasks", "prefetched"), issues)
    prefetched = body.get("prefetched", False)
    if not isinstance(prefetched, bool):
        issues["prefetched"] = "must be true or false, not %r" % (prefetched,)
    reported = body.get("tasks")
    claimed = []
    if not isinstance(reported, list) or not reported or len(reported) > _config("CLAIM_MAX_TASKS"):
        issues["tasks"] = "must be a list of 1 to %d {_id, attempt}, not %r" % (
            _config("CLAIM_MAX_TASKS"),
            reported if not isinstance(reported, list) else "%d items" % len(reported),
        )
        reported = []
    for i, entry in enumerate(reported):
        field = "tasks.%d" % i
        if not isinstance(entry, dict):
            issues[field] = "must be {_id, attempt}, not %r" % (entry,)
            continue
        req.check_unknown(entry, ("_id", "attempt"), issues, field + ".")
        try:
            task_id = ObjectId(entry.get("_id"))
        except (InvalidId, TypeError):
            issues[field + "._id"] = "%r is not a task id" % (entry.get("_id"),)
            continue
        attempt = req.parse_integer(entry.get("attempt"), field + ".attempt", issues, 1)
        claimed.append((task_id, attempt))
    issues.refuse()
    return req.reply({"released": release(worker_id, claimed, prefetched is True)})


@blueprint.route("/tasks/<task_id>/finish", methods=["POST"])
def finish_view(task_id):
    check_role(("worker", "admin"))
    task_id = req.parse_object_id(task_id, "task")
    body, issues = req.json_body(), req.Issues()
    report = req.parse_finish_report(body, "", issues)
    issues.refuse()
    return req.reply(finish(task_id, **report))


@blueprint.route("/tasks/<task_id>/logs", methods=["GET"])
def logs_view(task_id):
    check_role(())
    task_id = req.parse_object_id(task_id, "task")
    attempt = request.args.get("attempt")
    if attempt is not None:
        try:
            attempt = int(attempt)
        except ValueError:
            abort(400, description="attempt must be a number, not %r" % attempt)
    return req.reply(task_logs(task_id, attempt))


def init_app(app, db):
    """Wire the worker endpoints into `app` (after `services(app).queue` exists)."""
    services(app).workers = WorkerRegistry(db)
    services(app).logs = LogStore(db, app.config["LOG_CAP"])
    app.register_blueprint(blueprint)
