"""Actions on tasks that are not a change of fields: `POST /tasks/retry`.

A retry is not a PATCH of `state`: it starts a new attempt of a finished
task and brings back the tasks that were cancelled because of it, which a
field change would not say. The rules are `TaskQueue.retry`'s; this module
is the HTTP view (users retry their own tasks, admins any).
"""

from bson import ObjectId
from bson.errors import InvalidId
from flask import Blueprint, abort, request

from banyan.server import states
from banyan.server.auth import check_role, owner_filter
from banyan.server.refusals import status_of
from banyan.server.services import services
from banyan.server.worker_requests import reply

#: Most tasks one retry request may name.
MAX_RETRY = 10000

blueprint = Blueprint("actions", __name__)


def retry_internal(task_ids):
    """Retry each task of `task_ids` in turn; one result per task, in order
    (`_status` OK with the task's new `state`, or ERR with `_error`). A task
    already brought back by the retry of an earlier one is reported OK."""
    queue = services().queue
    results, revived = [], set()
    for task_id in task_ids:
        doc = queue.tasks.find_one(dict(owner_filter(), _id=task_id))
        if doc is None:
            results.append(
                {"_id": task_id, "_status": "ERR", "_error": {"code": 404, "message": "no task '%s'" % task_id}}
            )
            continue
        if task_id in revived:  # brought back by a retry earlier in this request
            results.append({"_id": task_id, "_status": "OK", "state": doc["state"]})
            continue
        try:
            doc = queue.retry(doc)
            revived.update(doc.pop("revived"))
        except states.TransitionError as e:
            results.append({"_id": task_id, "_status": "ERR", "_error": {"code": status_of(e), "message": str(e)}})
            continue
        results.append({"_id": task_id, "_status": "OK", "state": doc["state"]})
    return results


@blueprint.route("/tasks/retry", methods=["POST"])
def retry_view():
    """`POST /tasks/retry {"ids": [...]}` -> `{"_items": [result, ...]}`:
    200 when all were retried, else 422 (each result says why)."""
    check_role(("admin", "user"))
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("ids"), list) or set(body) - {"ids"}:
        abort(400, description='send {"ids": [task ids]}')
    if len(body["ids"]) > MAX_RETRY:
        abort(422, description="at most %d tasks per retry, not %d" % (MAX_RETRY, len(body["ids"])))
    ids = []
    for value in body["ids"]:
        try:
            ids.append(ObjectId(value))
        except (InvalidId, TypeError):
            abort(422, description="'ids': %r is not a task id" % (value,))
    results = retry_internal(list(dict.fromkeys(ids)))
    ok = all(r["_status"] == "OK" for r in results)
    return reply({"_status": "OK" if ok else "ERR", "_items": results}, 200 if ok else 422)


def init_app(app):
    app.register_blueprint(blueprint)
