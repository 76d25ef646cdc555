"""Eve event hooks for tasks: thin adapters into `states.TaskQueue`."""

import logging

from flask import abort

from banyan.protocol import ATTEMPT_ROLE
from banyan.server import claims, jobs, pending_changes, reasons, states, virtual
from banyan.server.auth import owner_filter
from banyan.server.identity import current_identity
from banyan.server.refusals import refuse
from banyan.server.services import services

log = logging.getLogger(__name__)


def register_hooks(app, queue):
    def on_pre_POST_tasks(request):
        # Eve's POST takes a document or a list of them and fails inside
        # (a 500) on any other JSON value.
        if request.is_json:
            body = request.get_json(silent=True)
            if body is not None and not isinstance(body, (dict, list)):
                abort(
                    400,
                    description="POST %s takes an object or a list of them, not %s"
                    % (request.path, type(body).__name__),
                )

    def on_pre_POST_jobs(request):
        on_pre_POST_tasks(request)
        # A job's id is the server's to make: one given by the client would
        # make a second POST of the same body a 409 instead of a new job.
        body = request.get_json(silent=True) if request.is_json else None
        if any(isinstance(doc, dict) and "_id" in doc for doc in (body if isinstance(body, list) else [body])):
            abort(422, description="'_id': a job's id is made by the server; leave it out")

    def on_insert_tasks(docs):
        identity = current_identity()
        adder = (identity.task_id, identity.job_id) if identity.role == ATTEMPT_ROLE else None
        try:
            queue.prepare_new(docs, owner=identity.name, adder=adder, visible=owner_filter())
        except states.TransitionError as e:
            refuse(e)

    def on_inserted_tasks(docs):
        queue.after_insert(docs)

    def on_update_tasks(updates, original):
        try:
            queue.prepare_update(updates, original, current_identity())
            added, removed = virtual.list_changes("tasks", updates, "continuations")
            if added or removed:
                lease = queue.begin_continuation_change(original, added, removed)
                pending_changes.pending()[original["_id"]] = (original, lease, removed)
        except states.TransitionError as e:
            refuse(e)

    def on_updated_tasks(updates, original):
        change = pending_changes.pending().pop(original["_id"], None)
        if change is not None:
            queue.end_continuation_change(original, change[1], change[2])
        queue.after_update(updates, original)
        if updates.get("state") == states.TaskState.RUNNING.value and "worker" in updates:
            # a per-item claim
            claims.confirm_claimer(updates["worker"], [(original["_id"], updates["history"][-1]["attempt"])])

    def on_insert_jobs(docs):
        for doc in docs:
            doc["owner"] = current_identity().name
            doc["added_tasks"] = 0

    def on_fetched_resource_jobs(response):
        jobs.add_counts(queue.db, response.get("_items") or [])

    def on_fetched_item_jobs(doc):
        jobs.add_counts(queue.db, [doc])

    def on_fetched_resource_tasks(response):
        reasons.add_pending_reasons(queue.db, response.get("_items") or [], services(app).workers)

    def on_fetched_item_tasks(doc):
        reasons.add_pending_reasons(queue.db, [doc], services(app).workers)

    app.on_insert_jobs += on_insert_jobs
    app.on_fetched_resource_jobs += on_fetched_resource_jobs
    app.on_fetched_item_jobs += on_fetched_item_jobs
    app.on_fetched_resource_tasks += on_fetched_resource_tasks
    app.on_fetched_item_tasks += on_fetched_item_tasks
    app.on_pre_POST_tasks += on_pre_POST_tasks
    app.on_pre_POST_jobs += on_pre_POST_jobs
    app.on_insert_tasks += on_insert_tasks
    app.on_inserted_tasks += on_inserted_tasks
    app.on_update_tasks += on_update_tasks
    app.on_updated_tasks += on_updated_tasks
    app.teardown_request(lambda error: pending_changes.settle(app))
