"""Bulk PATCH: `PATCH /tasks` with `[{"_id": id, <updates>}, ...]`.

Eve has no PATCH on a collection, so this is a blueprint rule next to Eve's
own `/tasks` rule. Each item is an item PATCH through Eve's `patch_internal`
(same validation, `on_update`/`on_updated` hooks and data layer), and one
item's refusal does not stop the others: the answer has a result per item,
in order, and is 200 only when every item was applied (otherwise the status
of the first refused item, with `_status: "ERR"`).

`patch_item` is also what the virtual-field endpoints (`virtual.py`) call.
"""

import logging

from bson import ObjectId
from bson.errors import InvalidId
from eve.auth import requires_auth
from eve.methods.patch import patch_internal
from eve.render import send_response
from flask import Blueprint, abort, request
from flask import current_app as app
from werkzeug.exceptions import HTTPException

from banyan.server import pending_changes

log = logging.getLogger(__name__)


def patch_item(resource, id_, updates):
    """PATCH one item as Eve's PATCH would (pre-request hooks included) and
    return (result, status) instead of raising: 404, 409, 422 and 403 come
    back as an item result. Anything begun by the hooks for this item and
    not finished (a continuation lease) is undone before the next item."""
    id_field = app.config["DOMAIN"][resource]["id_field"]
    lookup = {id_field: id_}
    try:
        app.on_pre_PATCH(resource, request, lookup)
        getattr(app, "on_pre_PATCH_%s" % resource)(request, lookup)
        result, _, _, status = patch_internal(
            resource, payload=updates, concurrency_check=False, skip_validation=False, **lookup
        )
    except HTTPException as e:
        message = e.description
        if e.code == 404:
            message = "%s '%s' does not exist" % (resource[:-1], id_)
        result, status = {"_status": "ERR", "_error": {"code": e.code, "message": message}}, e.code
    finally:
        pending_changes.settle(app)
    result = dict(result)
    result.setdefault(id_field, id_)
    return result, status


def batch_response(results):
    """One response for many item results [(result, status), ...]."""
    items = [result for result, _ in results]
    refused = [(result, status) for result, status in results if status >= 300]
    if not refused:
        return {"_status": "OK", "_items": items}, None, None, 200
    first, status = refused[0]
    message = (first.get("_error") or {}).get("message") or "validation failed: %s" % first.get("_issues")
    body = {
        "_status": "ERR",
        "_items": items,
        "_error": {
            "code": status,
            "message": "%d of %d updates refused; the first: %s" % (len(refused), len(results), message),
        },
    }
    return body, None, None, status


@requires_auth("resource")
def bulk_patch(resource):
    body = request.get_json(silent=True)
    if not isinstance(body, list) or not body:
        abort(400, description='PATCH %s needs a non-empty JSON list [{"_id": id, <updates>}, ...]' % request.path)
    id_field = app.config["DOMAIN"][resource]["id_field"]
    items = []
    for i, item in enumerate(body):
        if not isinstance(item, dict) or id_field not in item:
            abort(400, description="item %d must be an object with '%s' and the updates" % (i, id_field))
        try:
            id_ = ObjectId(item[id_field])
        except (InvalidId, TypeError):
            abort(400, description="item %d: '%s' is not a %s id" % (i, item[id_field], resource[:-1]))
        items.append((id_, {k: v for k, v in item.items() if k != id_field}))
    results = [patch_item(resource, id_, updates) for id_, updates in items]
    return send_response(resource, batch_response(results))


def register_bulk_patch(app, resource="tasks"):
    blueprint = Blueprint("bulk_patch_%s" % resource, __name__)
    url = "%s/%s" % (app.api_prefix, app.config["DOMAIN"][resource]["url"])
    blueprint.add_url_rule(
        url, "bulk_patch_%s" % resource, view_func=bulk_patch, methods=["PATCH"], defaults={"resource": resource}
    )
    app.register_blueprint(blueprint)
