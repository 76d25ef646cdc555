"""Continuation changes a request's hooks began and have not finished.

`on_update_tasks` takes a continuation lease before Eve writes the parent;
`on_updated_tasks` finishes the change once the write happened. When the
write never happens (it or a later hook refused), `settle` undoes the change.
Kept apart from `hooks` so that the bulk PATCH can settle after each item
without importing the hooks (which import the virtual resources, which
import the bulk PATCH).
"""

import logging

from flask import g

from banyan.server.services import services

log = logging.getLogger(__name__)

_KEY = "banyan_pending_continuation_changes"


def pending():
    """{task id: (original, lease, removed)} for the current request."""
    return g.setdefault(_KEY, {})


def settle(app):
    """Undo the continuation changes whose write never happened (the write
    or a later hook refused): links removed, leases released. Called after
    each item of a multi-item request and when any request ends."""
    left = g.pop(_KEY, None) or {}
    for original, lease, _ in left.values():
        try:
            services(app).queue.abort_continuation_change(original, lease)
        except Exception:
            log.exception("could not undo a continuation change on task %s", original.get("_id"))
