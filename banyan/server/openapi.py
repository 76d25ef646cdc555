"""`GET /openapi.json`: an OpenAPI 3.1 description of the API this server runs.

Generated, never written beside the code it describes:

- the paths are the app's own URL rules (`app.url_map`), so every endpoint
  the server has is described, and a rule nobody described fails the
  generation (`UndescribedEndpoint`) and so the suite;
- each Eve resource with URLs (tasks, jobs) gets the operations its
  `resource_methods` / `item_methods` declare, with roles, and its
  documents (read, created, changed) translated from the `DOMAIN` schema
  the validator uses, virtual fields included as
  `register_virtual_resources` put them there; the virtual endpoints come
  from `VIRTUAL_RESOURCES` (their kinds decide their URLs and bodies);
- the limits of the worker endpoints' bodies come from the settings and the
  modules that check them (`CLAIM_MAX_TASKS`, `WAIT_MAX_IDS`,
  `states.WORKER_OUTCOMES`, `auth.NAME_RE`, ...);
- the security schemes are the ones `auth` accepts (a bearer token, or HTTP
  Basic with the token as user name), required when authentication is on.

The document is built once per app (on first request) and kept in its `extensions`.
"""

import copy
import re

from flask import Blueprint, current_app, jsonify

from banyan import __version__
from banyan.protocol import INT64_MAX, ROLES, WORKER_STATES
from banyan.server import states
from banyan.server.auth import NAME_RE
from banyan.server.query import ALLOWED_OPERATORS
from banyan.server.worker_requests import USAGE_NAME

OBJECTID = {"type": "string", "pattern": "^[0-9a-f]{24}$"}
DATETIME = {"type": "string", "format": "date-time"}
SIZE_TEXT = {
    "type": "string",
    "description": "a size such as '512 MiB', '2 GiB', '2G' (binary) or '2 GB' "
    "(decimal); a lower-case 'b' (bits) is refused",
}
#: Eve's meta fields of a stored document, server-managed.
META = {
    "_id": OBJECTID,
    "_created": DATETIME,
    "_updated": DATETIME,
    "_etag": {"type": "string"},
    "_links": {"type": "object"},
}
ERROR = {"$ref": "#/components/schemas/Error"}


class UndescribedEndpoint(Exception):
    """A URL rule of the app that this module does not know how to describe."""


# -- Cerberus rules to JSON Schema ----------------------------------------------

_TYPES = {
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "list": {"type": "array"},
    "dict": {"type": "object"},
    "objectid": OBJECTID,
    "datetime": DATETIME,
}


def json_schema(rules, write=False):
    """The JSON Schema of a field whose Cerberus rules are `rules`; `write`:
    as a client sends it (closed objects, sizes as text too)."""
    types = rules.get("type")
    if types is None:
        schema = {}
    elif isinstance(types, list):
        schema = {"anyOf": [_typed(t, rules, write) for t in types]}
    else:
        schema = _typed(types, rules, write)
    if rules.get("coerce") == "bytes" and write:
        schema = {"anyOf": [schema, SIZE_TEXT]}
    if rules.get("nullable"):
        schema = _nullable(schema)
    if "default" in rules and not callable(rules["default"]):
        schema["default"] = copy.deepcopy(rules["default"])
    if rules.get("readonly"):
        schema["readOnly"] = True
    return schema


def _typed(name, rules, write):
    schema = copy.deepcopy(_TYPES.get(name, {}))
    if name == "string":
        if "maxlength" in rules:
            schema["maxLength"] = rules["maxlength"]
        if "regex" in rules:
            schema["pattern"] = "^(?:%s)$" % rules["regex"]
        if "allowed" in rules:
            schema["enum"] = list(rules["allowed"])
    elif name in ("integer", "number"):
        for rule, key in (("min", "minimum"), ("max", "maximum"), ("above", "exclusiveMinimum")):
            if rule in rules:
                schema[key] = rules[rule]
    elif name == "list":
        if "maxlength" in rules:
            schema["maxItems"] = rules["maxlength"]
        if isinstance(rules.get("schema"), dict) and "type" in rules["schema"]:
            schema["items"] = json_schema(rules["schema"], write)
    elif name == "dict":
        if isinstance(rules.get("schema"), dict):
            schema["properties"] = {k: json_schema(v, write) for k, v in rules["schema"].items()}
            if write:
                schema["additionalProperties"] = False
        if "keysrules" in rules:
            schema["propertyNames"] = json_schema(rules["keysrules"], write)
        if "valuesrules" in rules:
            schema["additionalProperties"] = json_schema(rules["valuesrules"], write)
    return schema


def _nullable(schema):
    if "anyOf" in schema:
        return {"anyOf": schema["anyOf"] + [{"type": "null"}]}
    if isinstance(schema.get("type"), str) and "pattern" not in schema and "enum" not in schema:
        return dict(schema, type=[schema["type"], "null"])
    return {"anyOf": [schema, {"type": "null"}]}


def public_resources(domain):
    """{name: schema name} of the Eve resources that have URLs ("tasks" -> "Task")."""
    return {
        name: (name[:-1] if name.endswith("s") else name).capitalize()
        for name, settings in domain.items()
        if not settings.get("internal_resource")
    }


def resource_schemas(domain, virtual):
    """For each Eve resource with URLs: its document as read (`Task`), as
    created (`TaskCreate`) and as changed (`TaskUpdate`), from its schema
    in `domain` (with the virtual fields `register_virtual_resources` put
    there) and `virtual`."""
    schemas = {}
    for resource, title in public_resources(domain).items():
        fields = domain[resource]["schema"]
        mine = {name: spec for name, spec in virtual.items() if spec.get("resource", "tasks") == resource}
        read = {name: json_schema(rules) for name, rules in fields.items() if not rules.get("virtual")}
        for name, spec in mine.items():
            if spec["kind"] == "alias":  # readable through projections
                target = fields[spec["target"]]
                shown = target.get("schema", {}) if spec.get("element") is not None else target
                read[name] = dict(_nullable(json_schema(shown)) if shown else {}, readOnly=True)
        read.update(META)
        writable = {
            name: rules for name, rules in fields.items() if not rules.get("readonly") and not rules.get("virtual")
        }
        create = {name: json_schema(rules, write=True) for name, rules in writable.items()}
        for rules in create.values():
            rules.pop("readOnly", None)
        update = {
            name: json_schema(rules, write=True) for name, rules in writable.items() if not rules.get("creation_only")
        }
        for name, spec in mine.items():
            if not spec.get("readonly"):
                update[name] = json_schema(fields[name], write=True)
        schemas[title] = {"type": "object", "properties": read}
        schemas[title + "Create"] = {"type": "object", "properties": create, "additionalProperties": False}
        schemas[title + "Update"] = {"type": "object", "properties": update, "additionalProperties": False}
    return schemas


# -- the worker endpoints' bodies -------------------------------------------------


def worker_schemas(config):
    resources = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "cores": {"type": "number", "minimum": 0, "maximum": INT64_MAX},
            "memory": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": INT64_MAX}, SIZE_TEXT]},
            "gpus": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
        },
    }
    stored = {
        name: json_schema(rules) for name, rules in config["DOMAIN"]["workers"]["schema"].items() if name != "token_id"
    }
    max_tasks = config["CLAIM_MAX_TASKS"]
    usage = {
        "anyOf": [
            {
                "type": "object",
                "propertyNames": {"pattern": USAGE_NAME.pattern.rstrip("\\Z") + "$"},
                "additionalProperties": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}]},
            },
            {"type": "null"},
        ]
    }
    progress = {
        "anyOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "fraction": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
                    "message": {"type": ["string", "null"]},
                },
            },
            {"type": "null"},
        ]
    }
    attempt = {"type": "integer", "minimum": 1}
    live_output = {
        "anyOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "description": "the end of a running attempt's output (banyan logs --follow)",
                "properties": {
                    "stdout_base64": {"type": "string", "contentEncoding": "base64"},
                    "stderr_base64": {"type": "string", "contentEncoding": "base64"},
                    "stdout_written": {"type": "integer", "minimum": 0},
                    "stderr_written": {"type": "integer", "minimum": 0},
                },
            },
            {"type": "null"},
        ]
    }
    finish = {
        "type": "object",
        "additionalProperties": False,
        "required": ["attempt", "outcome"],
        "description": "stdout/stderr as text, or *_base64 for output that is not UTF-8 (not both)",
        "properties": {
            "attempt": attempt,
            "outcome": {"enum": list(states.WORKER_OUTCOMES)},
            "exit_code": {"type": ["integer", "null"]},
            "stdout": {"type": ["string", "null"]},
            "stderr": {"type": ["string", "null"]},
            "stdout_base64": {"type": ["string", "null"], "contentEncoding": "base64"},
            "stderr_base64": {"type": ["string", "null"], "contentEncoding": "base64"},
            "usage": usage,
        },
    }
    report = dict(finish, required=["task", "attempt", "outcome"], properties=dict(finish["properties"], task=OBJECTID))
    return {
        "Resources": resources,
        "Worker": {
            "type": "object",
            "properties": dict(
                stored,
                _id=OBJECTID,
                resources={"type": ["object", "null"]},
                running={
                    "type": "array",
                    "items": OBJECTID,
                    "description": "the tasks it holds that the caller may see",
                },
            ),
        },
        "WorkerRegistration": {
            "type": "object",
            "additionalProperties": False,
            "required": ["host"],
            "properties": {
                "host": {"type": "string", "minLength": 1, "maxLength": 255},
                "resources": {"$ref": "#/components/schemas/Resources"},
            },
        },
        "Claim": {
            "type": "object",
            "additionalProperties": False,
            "required": ["free"],
            "properties": {
                "free": {"$ref": "#/components/schemas/Resources"},
                "max_tasks": {"type": "integer", "minimum": 1, "maximum": max_tasks, "default": 1},
                "wait": {
                    "anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}],
                    "description": "long-poll seconds (at most %s)" % config["CLAIM_MAX_WAIT"],
                },
                "finished": {
                    "type": "array",
                    "maxItems": max_tasks,
                    "items": report,
                    "description": "reports of ended attempts, delivered first (as POST /tasks/{id}/finish)",
                },
            },
        },
        "Claimed": {
            "type": "object",
            "properties": {
                "_items": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                "cancel": {"type": "array", "items": OBJECTID},
                "finished": {"type": "array", "items": {"type": "object"}},
                # present when nothing was claimed and the claim could not wait
                "retry_after": {"type": "number", "minimum": 0},
            },
        },
        "Heartbeat": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "tasks": {
                    "anyOf": [
                        {
                            "type": "object",
                            "propertyNames": OBJECTID,
                            "additionalProperties": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["attempt"],
                                "properties": {
                                    "attempt": attempt,
                                    "usage": usage,
                                    "progress": progress,
                                    "output": live_output,
                                },
                            },
                        },
                        {"type": "null"},
                    ]
                }
            },
        },
        "HeartbeatAnswer": {
            "type": "object",
            "properties": {
                "cancel": {"type": "array", "items": OBJECTID},
                "unknown": {"type": "array", "items": OBJECTID},
            },
        },
        "Release": {
            "type": "object",
            "additionalProperties": False,
            "required": ["tasks"],
            "properties": {
                "tasks": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": max_tasks,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["_id", "attempt"],
                        "properties": {"_id": OBJECTID, "attempt": attempt},
                    },
                }
            },
        },
        "Finish": finish,
        "Logs": {
            "type": "object",
            "properties": {
                "attempt": {"type": ["integer", "null"]},
                "stdout": {"type": "string"},
                "stderr": {"type": "string"},
                "stdout_base64": {
                    "type": "string",
                    "contentEncoding": "base64",
                    "description": "the exact bytes, when they are not UTF-8",
                },
                "stderr_base64": {"type": "string", "contentEncoding": "base64"},
                "live": {"type": "boolean", "description": "output of an attempt still running"},
                "stdout_written": {"type": ["integer", "null"], "description": "bytes written so far (live)"},
                "stderr_written": {"type": ["integer", "null"]},
            },
        },
        "Wait": {
            "type": "object",
            "additionalProperties": False,
            "required": ["ids"],
            "properties": {
                "ids": {"type": "array", "minItems": 1, "maxItems": config["WAIT_MAX_IDS"], "items": OBJECTID},
                "timeout": {
                    "type": "number",
                    "minimum": 0,
                    "description": "seconds (at most %s)" % config["WAIT_MAX_TIMEOUT"],
                },
                "outcomes": {"type": "boolean", "description": "also answer how each finished task ended"},
            },
        },
        "TokenRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["role"],
            "properties": {"role": {"enum": list(ROLES)}, "name": {"type": "string", "pattern": NAME_RE.pattern}},
        },
        "Token": {
            "type": "object",
            "properties": {
                "_id": {"type": "string"},
                "role": {"enum": list(ROLES)},
                "name": {"type": "string"},
                "created": DATETIME,
                "revoked": {"anyOf": [DATETIME, {"type": "null"}]},
                "token": {"type": "string", "description": "only in the answer to its creation"},
            },
        },
        "Error": {
            "type": "object",
            "properties": {
                "_status": {"const": "ERR"},
                "_error": {
                    "anyOf": [
                        {"type": "object", "properties": {"code": {"type": "integer"}, "message": {"type": "string"}}},
                        {"type": "string"},
                    ]
                },
                "_issues": {"type": "object"},
            },
        },
    }


# -- operations -------------------------------------------------------------------


def _json(schema):
    return {"application/json": {"schema": schema}}


def _ref(name):
    return {"$ref": "#/components/schemas/%s" % name}


def _answer(status, description, schema=None, media="application/json"):
    content = {media: {"schema": schema}} if schema is not None else None
    answer = {"description": description}
    if content:
        answer["content"] = content
    return {str(status): answer}


def _errors(*extra):
    """The error answers every operation may give (JSON in Eve's shape)."""
    answers = {
        "4XX": {"description": "refused: the message says what is wrong; nothing changed", "content": _json(ERROR)},
        "503": {"description": "the store cannot write now; nothing changed", "content": _json(ERROR)},
        "507": {"description": "the store's disk is full; nothing changed", "content": _json(ERROR)},
    }
    for status in extra:
        answers[str(status)] = answers["4XX"]
    return answers


def _query(name, description, schema=None):
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


WHERE = _query(
    "where",
    'a MongoDB filter as JSON (operators: %s) or Eve\'s python syntax (name=="x")'
    % ", ".join(sorted(ALLOWED_OPERATORS)),
)
LISTING = [
    WHERE,
    _query("projection", 'fields to include (1) or exclude (0), as JSON: {"name": 1}'),
    _query("sort", '[["field", 1 or -1], ...] as JSON, or "-field,other"'),
    _query("page", "page number, from 1", {"type": "integer", "minimum": 1}),
    _query("max_results", "items per page", {"type": "integer", "minimum": 1}),
]


def _listing(item):
    return {
        "type": "object",
        "properties": {
            "_items": {"type": "array", "items": item},
            "_meta": {"type": "object"},
            "_links": {"type": "object"},
        },
    }


def _op(summary, answers, body=None, params=(), public=False, roles=None):
    operation = {"summary": summary, "responses": dict(answers, **_errors())}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    if params:
        operation["parameters"] = list(params)
    if public:
        operation["security"] = []
    if roles:
        operation["x-roles"] = list(roles)
    return operation


def _targets(key, value_schema):
    return {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["targets", key],
            "properties": {"targets": {"type": "array", "minItems": 1, "items": OBJECTID}, key: value_schema},
        },
    }


def eve_operations(resource, title, settings, config):
    """The operations Eve serves for `resource`, as its settings declare them."""

    def roles(key):
        return settings.get(key) if config.get("AUTH") else None

    singular = title.lower()
    ops = {
        "%s|resource" % resource: {},
        "%s|item_lookup" % resource: {},
        "%s|item_post_override" % resource: {
            "POST": _op(
                "Eve's POST override of an item URL (X-HTTP-Method-Override)",
                _answer(200, "as the overridden method answers", {"type": "object"}),
                body={"type": "object"},
            )
        },
    }
    collection, item = ops["%s|resource" % resource], ops["%s|item_lookup" % resource]
    methods, item_methods = settings.get("resource_methods", ["GET"]), settings.get("item_methods", ["GET"])
    if "GET" in methods:
        collection["GET"] = _op(
            "%s (a user's own), a page at a time" % resource,
            _answer(200, "a page of %s" % resource, _listing(_ref(title))),
            params=LISTING,
            roles=roles("allowed_read_roles"),
        )
    if "POST" in methods:
        # banyan.server.idempotency: every collection's POST
        params = [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "the same key again (within %d hours) answers the first answer and "
                "creates nothing" % (config["IDEMPOTENCY_TTL"] // 3600),
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        ]
        collection["POST"] = _op(
            "create one %s, or several at once (all or none)" % singular,
            _answer(201, "created", {"type": "object"}),
            body={"anyOf": [_ref(title + "Create"), {"type": "array", "items": _ref(title + "Create")}]},
            params=params,
            roles=roles("allowed_write_roles"),
        )
    if "DELETE" in methods:
        collection["DELETE"] = _op(
            "delete every %s" % singular, _answer(204, "deleted"), roles=roles("allowed_write_roles")
        )
    if "GET" in item_methods:
        item["GET"] = _op(
            "one %s" % singular,
            _answer(200, "the %s" % singular, _ref(title)),
            params=[_query("projection", "fields to include (1) or exclude (0), as JSON")],
            roles=roles("allowed_item_read_roles"),
        )
    if "PATCH" in item_methods:
        item["PATCH"] = _op(
            "change a %s" % singular,
            _answer(200, "changed", {"type": "object"}),
            body=_ref(title + "Update"),
            roles=roles("allowed_item_write_roles"),
        )
    if "DELETE" in item_methods:
        item["DELETE"] = _op("delete a %s" % singular, _answer(204, "deleted"), roles=roles("allowed_item_write_roles"))
    return ops


def operations(config):
    """{Flask endpoint: {method: operation}} for every endpoint the server has."""
    domain, virtual = config["DOMAIN"], config["VIRTUAL_RESOURCES"]
    tasks = domain["tasks"]
    listing = _listing(_ref("Task"))
    ops = {
        "home": {
            "GET": _op("the resources this server serves", _answer(200, "their names and links", {"type": "object"}))
        },
        "bulk_patch_tasks.bulk_patch_tasks": {
            "PATCH": _op(
                "change many tasks, each validated as an item PATCH, a result per item",
                _answer(200, "every item changed", {"type": "object"}),
                body={
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "allOf": [_ref("TaskUpdate")],
                        "type": "object",
                        "required": ["_id"],
                        "properties": {"_id": OBJECTID},
                    },
                },
            )
        },
        "actions.retry_view": {
            "POST": _op(
                "run finished tasks again (and what their end cancelled); a result per task",
                _answer(200, "every task retried", {"type": "object"}),
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["ids"],
                    "properties": {"ids": {"type": "array", "items": OBJECTID}},
                },
                roles=("admin", "user"),
            )
        },
        "waits.wait_view": {
            "POST": _op(
                "hold until the tasks have all finished, or `timeout` passes",
                _answer(
                    200,
                    "those still unfinished (with `outcomes`: how the finished ones ended)",
                    {
                        "type": "object",
                        "properties": {
                            "unfinished": {"type": "object"},
                            "waited": {"type": "boolean"},
                            "finished": {"type": "object"},
                            "missing": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                ),
                body=_ref("Wait"),
            )
        },
        "claims.register_view": {
            "POST": _op(
                "register a worker (worker token)",
                _answer(201, "registered", _ref("Worker")),
                body=_ref("WorkerRegistration"),
                roles=("worker", "admin"),
            )
        },
        "claims.list_view": {
            "GET": _op(
                "workers, with the tasks each holds that the caller may see",
                _answer(200, "the workers", _listing(_ref("Worker"))),
                params=[_query("state", "active, lost or stopped", {"enum": [s.value for s in WORKER_STATES]}), WHERE],
            )
        },
        "claims.show_view": {"GET": _op("one worker", _answer(200, "the worker", _ref("Worker")))},
        "claims.unregister_view": {
            "DELETE": _op(
                "unregister a worker; the tasks it holds are abandoned",
                _answer(204, "unregistered"),
                roles=("worker", "admin"),
            )
        },
        "claims.claim_view": {
            "POST": _op(
                "claim ready tasks that fit `free`, highest priority first",
                _answer(200, "the claimed tasks", _ref("Claimed")),
                body=_ref("Claim"),
                roles=("worker", "admin"),
            )
        },
        "claims.heartbeat_view": {
            "POST": _op(
                "liveness, usage and progress of the tasks a worker runs",
                _answer(200, "what to cancel or drop", _ref("HeartbeatAnswer")),
                body=_ref("Heartbeat"),
                roles=("worker", "admin"),
            )
        },
        "claims.release_view": {
            "POST": _op(
                "hand back claimed tasks never started (no retry used)",
                _answer(
                    200,
                    "the ids handed back",
                    {"type": "object", "properties": {"released": {"type": "array", "items": OBJECTID}}},
                ),
                body=_ref("Release"),
                roles=("worker", "admin"),
            )
        },
        "claims.finish_view": {
            "POST": _op(
                "the end of an attempt, with its output",
                _answer(200, "the task as stored", {"type": "object"}),
                body=_ref("Finish"),
                roles=("worker", "admin"),
            )
        },
        "claims.logs_view": {
            "GET": _op(
                "an attempt's output (the last %d bytes of each stream)" % config["LOG_CAP"],
                _answer(200, "the output", _ref("Logs")),
                params=[_query("attempt", "this attempt (default: the latest)", {"type": "integer"})],
            )
        },
        "stats.get_stats": {
            "GET": _op(
                "statistics of the tasks the caller may see",
                _answer(200, "the figures", {"type": "object"}),
                params=[WHERE],
            )
        },
        "stats.get_worker_stats": {"GET": _op("per-worker load", _answer(200, "the figures", {"type": "object"}))},
        "stats.get_metrics": {
            "GET": _op(
                "Prometheus metrics",
                _answer(200, "text exposition format", {"type": "string"}, "text/plain"),
                params=[WHERE],
            )
        },
        "stats.get_dashboard": {
            "GET": _op(
                "the dashboard page (its figures come from the API)",
                _answer(200, "HTML", {"type": "string"}, "text/html"),
                public=True,
            )
        },
        "changes.changes_view": {
            "GET": _op(
                "a long poll: answers when the tasks the caller sees or the workers change (the dashboard's feed)",
                _answer(
                    200,
                    "the new version",
                    {
                        "type": "object",
                        "properties": {
                            "version": {"type": "string"},
                            "changed": {"type": "boolean"},
                            "retry_after": {"type": "number"},
                            "caller": {
                                "type": "object",
                                "properties": {"role": {"type": "string"}, "name": {"type": ["string", "null"]}},
                            },
                        },
                    },
                ),
                params=[
                    _query(
                        "since", "the version last seen: held while it is still the current one", {"type": "string"}
                    ),
                    _query(
                        "timeout",
                        "seconds to hold at most (capped at %d)" % config["CHANGES_MAX_TIMEOUT"],
                        {"type": "number", "minimum": 0},
                    ),
                ],
            )
        },
        "openapi.get_openapi": {
            "GET": _op("this description", _answer(200, "OpenAPI 3.1", {"type": "object"}), public=True)
        },
        "tokens.list_tokens": {
            "GET": _op(
                "tokens, without their secrets (admin)",
                _answer(200, "the tokens", _listing(_ref("Token"))),
                params=[_query("revoked", "1 to include revoked tokens")],
                roles=("admin",),
            )
        },
        "tokens.create_token": {
            "POST": _op(
                "make a token (admin); the secret is shown only here",
                _answer(201, "made", _ref("Token")),
                body=_ref("TokenRequest"),
                roles=("admin",),
            )
        },
        "tokens.revoke_token": {
            "DELETE": _op("revoke a token (admin)", _answer(200, "revoked", {"type": "object"}), roles=("admin",))
        },
    }
    for resource, title in public_resources(domain).items():
        ops.update(eve_operations(resource, title, domain[resource], config))
    fields = tasks["schema"]
    for name, spec in virtual.items():
        endpoint = "virtual_resources.%s_%s" % (spec["resource"], name)
        value = json_schema(fields[name], write=True) if not spec["readonly"] else {}
        if spec["kind"] == "alias":
            ops[endpoint + "_gather"] = {
                "GET": _op(
                    "`%s` (%s) of every task `where` selects" % (name, spec["target"]),
                    _answer(200, "a page of {_id, %s}" % name, listing),
                    params=LISTING,
                )
            }
        if not spec["readonly"]:
            key = "value" if spec["kind"] == "alias" else "values"
            ops[endpoint + "_resource"] = {
                "POST": _op(
                    "%s `%s` of many tasks" % (spec["kind"], spec["target"]),
                    _answer(200, "a result per target", {"type": "object"}),
                    body=_targets(key, value),
                )
            }
            ops[endpoint + "_item"] = {
                "POST": _op(
                    "%s `%s` of one task" % (spec["kind"], spec["target"]),
                    _answer(200, "the change", {"type": "object"}),
                    body=value,
                )
            }
    return ops


def links(config):
    """OpenAPI links from the answer that makes a thing to the operations
    on it (a stateful fuzzer follows them): [(endpoint, method, status,
    name, target endpoint, target method, {parameter: expression})]."""
    made = []
    for resource in public_resources(config["DOMAIN"]):
        settings = config["DOMAIN"][resource]
        if "POST" not in settings.get("resource_methods", []):
            continue
        for method in settings.get("item_methods", ["GET"]):
            made.append(
                (
                    "%s|resource" % resource,
                    "POST",
                    "201",
                    "%s_%s" % (method.lower(), resource),
                    "%s|item_lookup" % resource,
                    method,
                    {"_id": "$response.body#/_id"},
                )
            )
    for task_view in ("claims.finish_view", "claims.logs_view"):
        method = "POST" if task_view.endswith("finish_view") else "GET"
        made.append(
            (
                "tasks|resource",
                "POST",
                "201",
                task_view.split(".")[1],
                task_view,
                method,
                {"task_id": "$response.body#/_id"},
            )
        )
    for view, method in (
        ("claims.claim_view", "POST"),
        ("claims.heartbeat_view", "POST"),
        ("claims.release_view", "POST"),
        ("claims.show_view", "GET"),
        ("claims.unregister_view", "DELETE"),
    ):
        made.append(
            (
                "claims.register_view",
                "POST",
                "201",
                view.split(".")[1],
                view,
                method,
                {"worker_id": "$response.body#/_id"},
            )
        )
    made.append(
        (
            "tokens.create_token",
            "POST",
            "201",
            "revoke",
            "tokens.revoke_token",
            "DELETE",
            {"id_or_name": "$response.body#/_id"},
        )
    )
    return made


def _operation_id(endpoint, method):
    return "%s_%s" % (re.sub(r"\W+", "_", endpoint), method.lower())


_CONVERTER = re.compile(r"<(?:(?P<converter>[a-zA-Z_]+)(?:\((?P<args>[^)]*)\))?:)?(?P<name>\w+)>")


def _path(rule):
    """A Flask rule as an OpenAPI path and its path parameters."""
    params = []

    def replace(match):
        schema = {"type": "string"}
        if match.group("converter") == "regex":
            schema["pattern"] = "^%s$" % match.group("args").strip("\"'")
        params.append({"name": match.group("name"), "in": "path", "required": True, "schema": schema})
        return "{%s}" % match.group("name")

    return _CONVERTER.sub(replace, rule.rule), params


def build(app):
    """The OpenAPI document of `app`."""
    config = app.config
    ops = operations(config)
    paths = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        path, params = _path(rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            operation = ops.get(rule.endpoint, {}).get(method)
            if operation is None:
                raise UndescribedEndpoint(
                    "%s %s (endpoint %s) is not described in banyan.server.openapi" % (method, rule.rule, rule.endpoint)
                )
            operation = copy.deepcopy(operation)
            operation["operationId"] = _operation_id(rule.endpoint, method)
            for source, source_method, status, name, target, target_method, parameters in links(config):
                if (source, source_method) == (rule.endpoint, method):
                    answer = operation["responses"][status]
                    answer.setdefault("links", {})[name] = {
                        "operationId": _operation_id(target, target_method),
                        "parameters": parameters,
                    }
            if params:
                operation["parameters"] = params + operation.get("parameters", [])
            paths.setdefault(path, {})[method.lower()] = operation
    schemas = dict(resource_schemas(config["DOMAIN"], config["VIRTUAL_RESOURCES"]), **worker_schemas(config))
    security = [{"bearer": []}, {"basic": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Banyan",
            "version": __version__,
            "description": "A distributed job queue: tasks, workers, claims. Roles: admin (everything), "
            "user (their own tasks), worker (claims and reports). Generated from the "
            "server's own settings.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <token>"},
                "basic": {"type": "http", "scheme": "basic", "description": "the token as user name, no password"},
            },
        },
        "security": security if config.get("AUTH") else [{}] + security,
    }


blueprint = Blueprint("openapi", __name__)


@blueprint.route("/openapi.json", methods=["GET"])
def get_openapi():
    """Public: it says what the API is, nothing of what it holds."""
    app = current_app._get_current_object()
    # (not an attribute of the app: on Eve, an unknown one is an event slot)
    if "banyan_openapi" not in app.extensions:
        app.extensions["banyan_openapi"] = build(app)
    return jsonify(app.extensions["banyan_openapi"])


def init_app(app):
    app.register_blueprint(blueprint)
