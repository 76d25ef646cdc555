"""Virtual fields: fields read or written through endpoints of their own.

`VIRTUAL_RESOURCES` in `settings.py` declares them; `register_virtual_resources`
turns each entry into a schema entry and URL rules when the app is created
(as Eve's `register_resource` does for `DOMAIN`), so an entry of a known kind
needs no new code. An entry::

    "add_continuations": {
        "kind": "append",            # append | remove | alias
        "target": "continuations",   # the stored field it writes or reads
        "resource": "tasks",         # default "tasks"
        "allows_duplicates": False,  # append: $push if True, else $addToSet
        "readonly": False,           # alias: GET only
        "element": None,             # alias: show target[element] (e.g. -1)
        "writable_by": ["admin", "user"],  # roles that may write (else 403)
    }

Kinds and the URLs they get (`<name>` is the entry's key):

- `append` / `remove`: `$addToSet` (or `$push` where `allows_duplicates`) /
  `$pullAll` on the target list. Written three ways, all through Eve's
  `patch_internal` (validator, `on_update`/`on_updated` hooks, data layer):
  `POST /tasks/<name>` with `[{"targets": [ids], "values": [...]}, ...]`;
  `POST /tasks/<id>/<name>` with `[...]`; and `{"<name>": [...]}` inside
  `PATCH /tasks/<id>` (or a bulk `PATCH /tasks`). Values are validated
  against the target field's own schema from `settings.py` (types,
  `data_relation`), minus the rules that only make the target read-only.
- `alias`: another name for the target. `GET /tasks/<name>` gathers
  `[{"_id": ..., "<name>": ...}]` over the tasks a `where` selects (a
  projection of the collection; there is no item-level read: use
  `?projection={"<name>": 1}` on `/tasks/<id>`). Projections on the tasks
  resource include and exclude aliases like stored fields.
  A read-only alias (`current_history`: the last entry of `history`) can
  only be read. A read-write alias is renamed to its target before
  validation, so it obeys every rule of the target, and is written like the
  kinds above (`"value"` instead of `"values"` at resource level): one
  request sets the field on many tasks.

The read-write alias Banyan ships is `rank` -> `priority`: reprioritising a
whole set of waiting tasks in one request (`POST /tasks/rank` with
`[{"targets": [...], "value": 10}]`), as `scontrol update priority` or
`condor_prio` do. (The agenda's other example, a worker setting `worker` on
many tasks, is a claim in Banyan's design and goes through the claim
endpoints, which check states.)

Rules of the target (continuations: inactive children, no cycle,
`pending_dependency_count`) are applied by `hooks.py` through `states.py`,
for every form alike.
"""

import copy
import json
import logging

from bson import ObjectId
from bson.errors import InvalidId
from eve.auth import requires_auth
from eve.methods.get import get_internal
from eve.render import send_response
from flask import Blueprint, abort, g, has_request_context, request
from flask import current_app as app

from banyan.protocol import ROLES
from banyan.server import bulk
from banyan.server.identity import current_identity

log = logging.getLogger(__name__)

KINDS = ("append", "remove", "alias")
LIST_KINDS = ("append", "remove")
#: Rules of a target field that only say "not directly"; a virtual field
#: exists precisely to write the target in its own way.
_TARGET_ONLY_RULES = (
    "default",
    "creation_only",
    "readonly",
    "required",
    "write_once",
    "writable_by",
    "unique",
    "nullable",
)


# -- settings -------------------------------------------------------------


def normalize_spec(name, spec, domain):
    """A complete, checked copy of one VIRTUAL_RESOURCES entry (raises
    ValueError for a bad entry, when the app is created)."""
    spec = dict(spec)
    spec.setdefault("resource", "tasks")
    spec.setdefault("allows_duplicates", False)
    spec.setdefault("readonly", False)
    spec.setdefault("element", None)
    spec.setdefault("writable_by", list(ROLES))
    if spec.get("kind") not in KINDS:
        raise ValueError("VIRTUAL_RESOURCES[%r]: kind must be one of %s" % (name, ", ".join(KINDS)))
    schema = domain.get(spec["resource"], {}).get("schema")
    if schema is None:
        raise ValueError("VIRTUAL_RESOURCES[%r]: unknown resource %r" % (name, spec["resource"]))
    if spec.get("target") not in schema:
        raise ValueError("VIRTUAL_RESOURCES[%r]: unknown target field %r" % (name, spec.get("target")))
    if name in schema and not schema[name].get("virtual"):
        raise ValueError("VIRTUAL_RESOURCES[%r]: the name is already a stored field" % name)
    if spec["kind"] in LIST_KINDS and schema[spec["target"]].get("type") != "list":
        raise ValueError("VIRTUAL_RESOURCES[%r]: %s needs a list target" % (name, spec["kind"]))
    if spec["readonly"] and spec["kind"] != "alias":
        raise ValueError("VIRTUAL_RESOURCES[%r]: only an alias can be readonly" % name)
    return spec


def specs(resource=None, kinds=KINDS):
    """The current app's virtual fields {name: spec}, optionally only those
    of `resource` and of the given kinds."""
    return {
        name: spec
        for name, spec in app.config["VIRTUAL_RESOURCES"].items()
        if spec["kind"] in kinds and (resource is None or spec["resource"] == resource)
    }


def field_schema(name, spec, target_schema):
    """The schema entry of a virtual field: the target's own schema (so
    payloads are serialized and validated like the target), without the
    rules that only make the target read-only."""
    if spec["kind"] == "alias" and spec["readonly"]:
        return {"readonly": True, "virtual": name}
    schema = {k: copy.deepcopy(v) for k, v in target_schema.items() if k not in _TARGET_ONLY_RULES}
    if spec["kind"] == "alias":
        schema["nullable"] = target_schema.get("nullable", False)
    schema["virtual"] = name
    return schema


# -- registration -----------------------------------------------------------


def register_virtual_resources(app):
    """Build every entry of VIRTUAL_RESOURCES (one blueprint for all), the
    read hooks that show aliases, and bulk PATCH."""
    blueprint = Blueprint("virtual_resources", __name__)
    for name, spec in list(app.config["VIRTUAL_RESOURCES"].items()):
        register_virtual_resource(app, name, spec, blueprint)
    app.register_blueprint(blueprint)
    app.on_fetched_item += _show_aliases_in_item
    app.on_fetched_resource += _show_aliases_in_resource
    bulk.register_bulk_patch(app)


def register_virtual_resource(app, name, spec, blueprint):
    """Turn one VIRTUAL_RESOURCES entry into a schema entry and URL rules."""
    domain = app.config["DOMAIN"]
    spec = app.config["VIRTUAL_RESOURCES"][name] = normalize_spec(name, spec, domain)
    resource = spec["resource"]
    settings = domain[resource]
    settings["schema"][name] = field_schema(name, spec, settings["schema"][spec["target"]])
    url = "%s/%s/%s" % (app.api_prefix, settings["url"], name)
    item_url = "%s/%s/<%s:_id>/%s" % (app.api_prefix, settings["url"], settings["item_url"], name)
    defaults = {"resource": resource, "name": name}
    endpoint = "%s_%s" % (resource, name)
    if spec["kind"] == "alias":
        blueprint.add_url_rule(url, endpoint + "_gather", view_func=gather, methods=["GET"], defaults=defaults)
    if not spec["readonly"]:
        blueprint.add_url_rule(url, endpoint + "_resource", view_func=write_many, methods=["POST"], defaults=defaults)
        blueprint.add_url_rule(item_url, endpoint + "_item", view_func=write_one, methods=["POST"], defaults=defaults)
    log.debug("virtual field %s.%s: %s", resource, name, spec)


# -- views --------------------------------------------------------------------


@requires_auth("resource")
def gather(resource, name):
    """GET /tasks/<alias>: the alias of every task `where` selects, through
    Eve's own GET (pagination, sorting, user restrictions, hooks)."""
    lookup = {}
    app.on_pre_GET(resource, request, lookup)
    getattr(app, "on_pre_GET_%s" % resource)(request, lookup)
    g.banyan_forced_projection = {name: 1}
    return send_response(resource, get_internal(resource, **lookup))


@requires_auth("item")
def write_one(resource, name, _id):
    """POST /tasks/<id>/<name> with the value: a PATCH of that one task."""
    value = _json_body()
    result, status = bulk.patch_item(resource, _object_id(_id, status=404), {name: value})
    return send_response(resource, (result, None, None, status))


@requires_auth("resource")
def write_many(resource, name):
    """POST /tasks/<name> with `[{"targets": [ids], "values": ...}, ...]`:
    each target is patched on its own (a result per target, in order)."""
    spec = app.config["VIRTUAL_RESOURCES"][name]
    key = "value" if spec["kind"] == "alias" else "values"
    groups = _json_body()
    shape = '[{"targets": [ids], "%s": ...}, ...]' % key
    if not isinstance(groups, list) or not groups:
        abort(400, description="the body of POST %s must be a non-empty list %s" % (request.path, shape))
    updates = []
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or set(group) != {"targets", key}:
            abort(
                400,
                description="item %d of the body must be an object with exactly the keys "
                "'targets' and '%s' (%s), not %s" % (i, key, shape, json.dumps(group)[:200]),
            )
        targets = group["targets"]
        if not isinstance(targets, list) or not targets:
            abort(400, description="item %d: 'targets' must be a non-empty list of task ids" % i)
        for target in targets:
            updates.append((_object_id(target, status=400), {name: copy.deepcopy(group[key])}))
    results = [bulk.patch_item(resource, target, update) for target, update in updates]
    return send_response(resource, bulk.batch_response(results))


def _json_body():
    body = request.get_json(silent=True)
    if body is None and request.get_data(cache=True).strip() not in (b"null",):
        abort(400, description="the body must be JSON")
    return body


def _object_id(value, status):
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        abort(status, description="'%s' is not a task id" % (value,))


# -- writes: checks shared by every form ---------------------------------------


def check_writable(name, spec):
    """403 unless the caller's role may write the virtual field `name`."""
    role = current_identity().role
    if role not in spec["writable_by"]:
        abort(
            403,
            description="'%s' may be written only by %s, not by a %s" % (name, " or ".join(spec["writable_by"]), role),
        )


def prepare_update(resource, document):
    """A PATCH payload as the validator should see it: every virtual field's
    role checked (403), read-write aliases renamed to their targets."""
    virtual = specs(resource)
    out = {}
    for key, value in document.items():
        spec = virtual.get(key)
        if spec is None or spec["readonly"]:
            out[key] = value
            continue
        check_writable(key, spec)
        if spec["kind"] == "alias":
            if spec["target"] in document:
                abort(422, description="give '%s' or its alias '%s', not both" % (spec["target"], key))
            out[spec["target"]] = value
        else:
            out[key] = value
    return out


def list_changes(resource, updates, target):
    """(added, removed) values of `target` requested by the virtual fields
    in `updates`."""
    added, removed = [], []
    for name, spec in specs(resource, LIST_KINDS).items():
        if spec["target"] == target and name in updates:
            (added if spec["kind"] == "append" else removed).extend(updates[name] or [])
    return added, removed


def update_operators(resource, updates):
    """The Mongo update for `updates`: `$set` for stored fields, and
    `$addToSet`/`$push`/`$pullAll` for the virtual list fields (the validator
    allows at most one per target). `updates` is left as it is: it is the
    dict `on_updated` receives."""
    virtual = specs(resource, LIST_KINDS)
    sets, ops = {}, {}
    for field, value in updates.items():
        spec = virtual.get(field)
        if spec is None:
            sets[field] = value
        elif spec["kind"] == "remove":
            # $pullAll, not $pull with $in: FerretDB 1.24 ignores a $pull condition
            ops.setdefault("$pullAll", {})[spec["target"]] = list(value)
        else:
            op = "$push" if spec["allows_duplicates"] else "$addToSet"
            ops.setdefault(op, {})[spec["target"]] = {"$each": list(value)}
    return dict({"$set": sets}, **ops), bool(ops)


# -- reads: aliases in projections ---------------------------------------------


def plan_projection(resource, projection):
    """Map a client projection over virtual fields to one over stored
    fields, and remember (per request) which aliases to show and which
    targets, fetched only to compute them, to hide."""
    if not has_request_context():
        return projection
    projection = dict(projection or {})
    inclusive = any(v in (1, True) for v in projection.values())
    show, hide = [], []
    for name, spec in specs(resource, ("alias",)).items():
        asked = projection.pop(name, None)
        if not (asked if inclusive else asked is None or asked):
            continue
        show.append(name)
        target = spec["target"]
        if inclusive and not projection.get(target):
            parts = [k for k in projection if k.startswith(target + ".")]
            if parts:
                abort(
                    400,
                    description="'projection' asks for '%s', computed from all of '%s', and for "
                    "'%s' alone: ask for one or the other" % (name, target, parts[0]),
                )
            projection[target] = 1
            hide.append(target)
        elif not inclusive and target in projection and not projection[target]:
            del projection[target]
            hide.append(target)
    for name in specs(resource, LIST_KINDS):
        projection.pop(name, None)
    plans = g.setdefault("banyan_alias_plans", {})
    plans[resource] = (show, hide)
    return projection


def alias_value(resource, name, doc):
    """The read-only alias `name` of `doc` (a stored document of
    `resource`), as a GET shows it."""
    return _alias_value(doc, specs(resource, ("alias",))[name])


def _alias_value(doc, spec):
    value = doc.get(spec["target"])
    if spec["element"] is None:
        return value
    try:
        return value[spec["element"]]
    except (IndexError, KeyError, TypeError):
        return None


def _show_aliases(resource, docs):
    virtual = specs(resource, ("alias",))
    if not virtual:
        return
    show, hide = g.get("banyan_alias_plans", {}).get(resource, (list(virtual), []))
    for doc in docs:
        for name in show:
            if virtual[name]["target"] in doc:
                doc[name] = _alias_value(doc, virtual[name])
        for target in hide:
            doc.pop(target, None)


def _show_aliases_in_item(resource, doc):
    _show_aliases(resource, [doc])


def _show_aliases_in_resource(resource, response):
    _show_aliases(resource, response.get("_items", []))
