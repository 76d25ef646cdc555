"""Waits on tasks to finish, pushed rather than polled: `POST /tasks/wait`.

    POST /tasks/wait  {"ids": [task ids], "timeout": 20, "outcomes": true}
        -> 200 {"unfinished": {id: state}, "waited": true,
                "finished": {id: {name, state, exit_status, current_history, cancelled_by}},
                "missing": [ids]}

The answer comes as soon as none of `ids` is unfinished, or when `timeout`
seconds (at most `WAIT_MAX_TIMEOUT`) have passed; `unfinished` then lists
those still running, waiting or queued, with their states. Ids of tasks
that do not exist, or that the caller may not see, count as not unfinished
(the caller finds out when it reads them). With `outcomes`, the answer also
carries how each finished task ended (`finished`) and names the ids of no
task (`missing`; then it comes at once): what a waiting client would
otherwise read before and after the wait, in round trips of their own.

A held wait costs nothing while nothing changes: it sleeps on an `Event`
registered with `FinishWaiters`, which `TaskQueue.on_finished` wakes when
the last of its tasks finishes in this process. It also looks again every
`WAIT_RECHECK_INTERVAL` seconds, since in Mongo mode another server
process may have finished them (on the embedded store, which no other
process writes, twice as long after each look). When `WAIT_MAX_WAITERS` waits are already
held in this process, a wait answers at once with `"waited": false` (the
client then polls), so that waits never take every request thread.
"""

import contextlib
import time

from bson import ObjectId
from bson.errors import InvalidId
from flask import Blueprint, current_app

from banyan.protocol import FINISHED
from banyan.server import store, virtual, worker_requests
from banyan.server.auth import check_role, owner_filter
from banyan.server.held import HeldRequests
from banyan.server.services import services


class FinishWaiters(HeldRequests):
    """Waits held open in this process, each with the ids it still waits for.

    `notify(task_id)` (the queue's `on_finished`) crosses the task off every
    wait that has it and wakes those left with nothing. The lock guards only
    this in-process table; what a wait answers is always read from the store.
    """

    def waiting(self, task_ids, limit):
        """An Event set once every one of `task_ids` (kept as the set of ids
        not yet known finished) has been reported finished; None (do not
        wait) when `limit` waits are already held."""
        return super().waiting(set(task_ids), limit)

    def narrow(self, event, task_ids):
        """The store says only `task_ids` are unfinished: wait for those alone.
        Only ever removes ids, so a finish reported meanwhile is not undone."""
        with self._lock:
            left = self._waiting.get(event)
            if left is not None:
                left.intersection_update(task_ids)
                if not left:
                    event.set()

    def remaining(self, event):
        """The ids the wait of `event` has not seen reported finished."""
        with self._lock:
            return list(self._waiting.get(event, ()))

    def notify(self, task_id):
        with self._lock:
            for event, left in self._waiting.items():
                if task_id in left:
                    left.discard(task_id)
                    if not left:
                        event.set()


#: What a wait with `outcomes` answers of each finished task: enough to say
#: how it ended (`banyan.waiting.OUTCOME_PROJECTION`; `current_history`,
#: the tasks' alias of the last entry of `history`, is computed from it).
OUTCOME_FIELDS = {"name": 1, "state": 1, "exit_status": 1, "cancelled_by": 1, "history": 1}


def _outcomes(queue, task_ids, visible):
    """{id: how it ended} of those of `task_ids` that have finished (and that
    the caller may see)."""
    finished = {}
    for doc in store.find_in(
        queue.tasks, "_id", task_ids, dict(visible or {}, state={"$in": [s.value for s in FINISHED]}), OUTCOME_FIELDS
    ):
        ended = {key: doc.get(key) for key in ("_id", "name", "state", "exit_status", "cancelled_by")}
        ended["current_history"] = virtual.alias_value("tasks", "current_history", doc)
        finished[str(doc["_id"])] = ended
    return finished


def wait_finished(task_ids, timeout, outcomes=False):
    """`{"unfinished": {id: state}, "waited": bool}` once none of `task_ids`
    (that the caller may see) is unfinished, or after `timeout` seconds.
    `outcomes`: the answer also says how the finished ones ended
    (`finished`) and which of `task_ids` name no task (`missing`), and
    comes at once when some do."""
    queue, waiters, config = services().queue, services().finish_waiters, current_app.config
    visible = owner_filter()
    timeout = min(max(0.0, timeout), config["WAIT_MAX_TIMEOUT"])
    deadline = time.monotonic() + timeout
    recheck = config["WAIT_RECHECK_INTERVAL"]
    sole = store.sole_writer(queue.tasks.database.client)
    left = list(task_ids)
    finished = missing = None
    with waiters.waiting(left, config["WAIT_MAX_WAITERS"]) if timeout > 0 else contextlib.nullcontext() as event:
        while True:
            if event is not None:
                event.clear()
            unfinished = queue.unfinished(left, visible) if left else {}
            if outcomes and missing is None:  # the first look: how they all stand
                finished = _outcomes(queue, [t for t in task_ids if t not in unfinished], visible)
                missing = [t for t in task_ids if t not in unfinished and str(t) not in finished]
                if missing:
                    break  # the caller cannot wait for tasks that are not there
            remaining = deadline - time.monotonic()
            if not unfinished or event is None or remaining <= 0:
                break
            finished = None  # (read again at the end)
            waiters.narrow(event, unfinished)
            event.wait(min(remaining, recheck))
            if waiters.released:
                break  # the server stops: answered as at the end of the wait
            if sole and event is not None and not event.is_set():
                # Only this process writes: its finishes wake the wait, and a
                # re-check (a read of every id left) is a safety net that may
                # be rarer each time (it cost a seventh of a busy server).
                recheck = min(2 * recheck, config["WAIT_MAX_TIMEOUT"])
            # those reported finished meanwhile are: ask only about the others
            left = waiters.remaining(event)
    # What was read may be writes another request has made visible and not
    # yet synced: an answer never reports what a crash could still undo.
    answer = {
        "unfinished": {str(task_id): state for task_id, state in unfinished.items()},
        "waited": event is not None or timeout == 0,
    }
    if outcomes:
        if finished is None:
            finished = _outcomes(queue, [t for t in task_ids if t not in unfinished], visible)
        answer.update(finished=finished, missing=[str(t) for t in missing or ()])
    store.sync_visible(queue.tasks.database.client)
    return answer


blueprint = Blueprint("waits", __name__)


@blueprint.route("/tasks/wait", methods=["POST"])
def wait_view():
    check_role(())
    body, issues = worker_requests.json_body(), worker_requests.Issues()
    worker_requests.check_unknown(body, ("ids", "timeout", "outcomes"), issues)
    ids = body.get("ids")
    task_ids = []
    limit = current_app.config["WAIT_MAX_IDS"]
    if not isinstance(ids, list) or not 0 < len(ids) <= limit:
        issues["ids"] = "must be a list of 1 to %d task ids, not %s" % (
            limit,
            "%d ids" % len(ids) if isinstance(ids, list) else repr(ids)[:100],
        )
    else:
        for value in ids:
            try:
                task_ids.append(ObjectId(value))
            except (InvalidId, TypeError):
                issues["ids"] = "'%s' is not a task id" % (value,)
                break
    timeout = body.get("timeout", current_app.config["WAIT_MAX_TIMEOUT"])
    if not worker_requests.is_number(timeout) or timeout < 0:
        issues["timeout"] = "must be a number of seconds >= 0, not %r" % (timeout,)
    outcomes = body.get("outcomes", False)
    if not isinstance(outcomes, bool):
        issues["outcomes"] = "must be true or false, not %r" % (outcomes,)
    issues.refuse()
    return worker_requests.reply(wait_finished(list(dict.fromkeys(task_ids)), float(timeout), outcomes))


def init_app(app):
    """Wire the wait endpoint into `app`; `services(app).finish_waiters` must exist
    before the queue is made (it is the queue's `on_finished`)."""
    app.register_blueprint(blueprint)
