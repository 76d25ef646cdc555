"""Fuzz: hypothesis-generated bodies against every POST and PATCH that
writes tasks: the Eve resource, bulk PATCH, each VIRTUAL_RESOURCES entry
(resource and item level) and the worker endpoints (register, claim,
heartbeat, finish); and hypothesis-generated query strings (`where`,
`projection`, `sort`, paging) against every GET that takes them (`/tasks`,
the virtual gathers, `/stats`, `/metrics`, `/workers`), which the OpenAPI
description cannot express (tests/test_openapi.py fuzzes the rest from it).
Never a 500 (the test client fails on one), and a 4xx changes nothing in
the database.

Requests go to the in-process app (authentication on, one token per role)
on the embedded store with its journal. BANYAN_FUZZ_EXAMPLES sets the
examples per endpoint (the query strings get three times as many: 3400 makes
the 10,000 requests of the slow run).
"""

import json
import os

import pytest
from bson import ObjectId
from conftest import NoServerErrorClient
from harness import record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banyan import settings as banyan_settings
from banyan.server.app import create_app
from banyan.server.auth import TokenStore

EXAMPLES = int(os.environ.get("BANYAN_FUZZ_EXAMPLES", "120"))
COLLECTIONS = ("tasks", "workers", "logs", "tokens")
FIELDS = sorted(banyan_settings.task_schema)
VIRTUAL = banyan_settings.VIRTUAL_RESOURCES
WRITABLE_VIRTUAL = sorted(n for n, s in VIRTUAL.items() if not s.get("readonly"))
READONLY_VIRTUAL = sorted(n for n, s in VIRTUAL.items() if s.get("readonly"))
STATES = ["inactive", "available", "running", "pending_cancellation", "cancelled", "terminated"]


# -- the world the requests land in ---------------------------------------------------


class World:
    """An app with authentication on, tokens for each role, a registered
    worker and tasks in every state, owned by two users."""

    def __init__(self, store):
        client, dbname = store
        self.app = create_app(client, {"MONGO_DBNAME": dbname, "TESTING": True, "AUTH": True, "CLAIM_MAX_WAIT": 0.01})
        self.app.test_client_class = NoServerErrorClient
        self.client = self.app.test_client()
        self.db = client[dbname]
        tokens = TokenStore(self.db)
        self.tokens = {
            "admin": tokens.create("admin", "root")[1],
            "user": tokens.create("user", "alice")[1],
            "other": tokens.create("user", "bob")[1],
            "worker": tokens.create("worker", "node1")[1],
            "anonymous": None,
        }
        self.requests = 0
        self.refused = 0
        self.wid = self.call(
            "worker", "POST", "/workers", {"host": "node1", "resources": {"cores": 64, "memory": 1 << 40, "gpus": 0}}
        ).json["_id"]
        self.ids = {}
        for owner in ("user", "other"):
            made = self.call(
                owner,
                "POST",
                "/tasks",
                [
                    {"name": "%s-%d" % (owner, i), "command": "true", "state": "available", "priority": 100 - i}
                    for i in range(6)
                ],
            ).json["_items"]
            ids = [m["_id"] for m in made]
            # 6 available; claim 4 (running), then finish / cancel some
            self.call("worker", "POST", "/workers/%s/claim" % self.wid, {"free": {"cores": 4}, "max_tasks": 4})
            self.call("worker", "POST", "/tasks/%s/finish" % ids[0], {"attempt": 1, "outcome": "success"})
            self.call("worker", "POST", "/tasks/%s/finish" % ids[1], {"attempt": 1, "outcome": "failure"})
            self.call(owner, "PATCH", "/tasks/%s" % ids[2], {"state": "cancelled"})  # pending_cancellation
            self.call(owner, "PATCH", "/tasks/%s" % ids[5], {"state": "cancelled"})
            children = [
                self.call(owner, "POST", "/tasks", {"name": "%s-child%d" % (owner, i), "command": "true"}).json["_id"]
                for i in range(3)
            ]
            parent = self.call(
                owner, "POST", "/tasks", {"name": "%s-parent" % owner, "command": "true", "continuations": children[:2]}
            ).json["_id"]
            self.ids[owner] = ids + children + [parent]
        self.all_ids = self.ids["user"] + self.ids["other"]
        states = {d["state"] for d in self.db.tasks.find({}, {"state": 1})}
        assert set(STATES) <= states, states

    def call(self, role, method, path, body=None, raw=None, content_type="application/json"):
        headers = {}
        if self.tokens.get(role):
            headers["Authorization"] = "Bearer " + self.tokens[role]
        data = raw if raw is not None else json.dumps(body)
        self.requests += 1
        return self.client.open(path, method=method, data=data, headers=headers, content_type=content_type)

    def snapshot(self):
        return {name: {str(d["_id"]): d for d in self.db[name].find()} for name in COLLECTIONS}


def changed(before, after):
    """{collection: [ids of documents added, removed or changed]}."""
    out = {}
    for name in COLLECTIONS:
        b, a = before[name], after[name]
        ids = sorted(k for k in set(b) | set(a) if b.get(k) != a.get(k))
        if ids:
            out[name] = ids
    return out


# -- strategies ------------------------------------------------------------------------


def world_ids(world):
    return (
        st.sampled_from(world.all_ids)
        | st.just(str(ObjectId()))
        | st.sampled_from(["", "x", "0" * 24, "z" * 24, "../tasks", "%00", "1e3"])
        | st.text(max_size=30)
    )


KEYS = st.sampled_from(
    FIELDS
    + sorted(VIRTUAL)
    + [
        "_id",
        "_etag",
        "_created",
        "$set",
        "$where",
        "a.b",
        "targets",
        "values",
        "value",
        "free",
        "max_tasks",
        "wait",
        "tasks",
        "attempt",
        "outcome",
        "exit_code",
        "stdout",
        "stderr",
        "usage",
        "progress",
        "host",
        "resources",
        "cores",
        "memory",
        "gpus",
        "fraction",
        "message",
    ]
) | st.text(max_size=10)

#: Values at the edges of what JSON, BSON and the store can hold.
EDGE_VALUES = [
    2**63,
    2**63 - 1,
    -(2**63) - 1,
    2**64,
    10**30,
    1e308,
    -0.0,
    5e-324,
    float("nan"),
    float("inf"),
    "\ud800",
    "a\udfff",
    "\x00",
    "a\x00b",
    "$in",
    "a.b",
    "x" * 2000,
    -1,
    0,
    True,
    None,
    "",
    [],
    {},
]
EDGES = st.sampled_from(EDGE_VALUES)

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 1001)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    # any code point, unpaired surrogates included ("\ud800" in the JSON)
    | st.text(st.characters(exclude_categories=()), max_size=10)
    | EDGES
    | st.sampled_from(
        STATES
        + [
            "success",
            "failure",
            "timeout",
            "cancelled",
            "abandoned (worker unreachable)",
            "512 MiB",
            "1 GiB",
            "-1 GiB",
            "1e400",
            "2GB",
            "0",
            "true",
            "null",
            "{}",
            "[]",
        ]
    )
)


def json_values(ids):
    leaves = LEAVES | ids
    return st.recursive(
        leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
    )


def field_values(ids):
    """Plausible values for each task field, mixed with anything."""
    anything = json_values(ids)
    resources = (
        st.fixed_dictionaries(
            {},
            optional={
                "cores": st.integers(-2, 64) | st.floats(-1, 64) | anything,
                "memory": st.sampled_from(["512 MiB", "1 GiB", "2GB", "-5", "lots"])
                | st.integers(-1, 2**64)
                | anything,
                "gpus": st.integers(-1, 4) | st.floats(0, 2) | anything,
            },
        )
        | anything
    )
    per_field = {
        "name": st.text(max_size=50) | anything,
        "command": st.text(max_size=50) | st.lists(st.text(max_size=10), max_size=4) | anything,
        "requested_resources": resources,
        "environment": st.dictionaries(st.text(max_size=8), st.text(max_size=8) | anything, max_size=3) | anything,
        "state": st.sampled_from(STATES) | anything,
        "continuations": st.lists(ids, max_size=4) | anything,
        "worker": ids | anything,
    }
    for name in WRITABLE_VIRTUAL:
        per_field[name] = st.lists(ids, max_size=4) | st.integers(-5, 5) | anything
    return {f: per_field.get(f, anything) for f in FIELDS + WRITABLE_VIRTUAL + READONLY_VIRTUAL}


def near_valid(ids):
    """A valid task with one or two fields set to anything: gets past most
    rules, so the odd value reaches the deep end (store, hooks, cascades)."""
    fields = field_values(ids)
    base = st.sampled_from(
        [
            {"name": "n", "command": "true"},
            {"command": ["echo", "x"], "state": "available", "priority": 3},
            {"name": "b", "state": "inactive", "requested_resources": {"cores": 1}},
        ]
    )
    change = st.sampled_from(sorted(fields)).flatmap(lambda k: (EDGES | fields[k]).map(lambda v: (k, v))) | st.tuples(
        KEYS, EDGES | json_values(ids)
    )
    return st.tuples(base, st.lists(change, min_size=1, max_size=2)).map(lambda t: dict(t[0], **dict(t[1])))


def task_documents(ids):
    """A near-valid task, a task-like object (any subset of the fields) or
    any JSON value."""
    return near_valid(ids) | st.fixed_dictionaries({}, optional=field_values(ids)) | json_values(ids)


ROLES = st.sampled_from(["admin", "user", "other", "worker", "anonymous"])
RAW = st.sampled_from(
    [b"", b"{", b"[1,", b"\xff\xfe", b"null", b"NaN", b'{"a": 1}{"b": 2}', b"[" * 100 + b"]" * 100]
) | st.binary(max_size=60)


def run_fuzz(world, method, path_strategy, body_strategy, label):
    """Send `EXAMPLES` generated requests; each 4xx must leave the database
    as it was (for a multi-item request: except the items it applied)."""
    ids = world_ids(world)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(
        role=ROLES,
        path=path_strategy(ids),
        body=body_strategy(ids),
        raw=st.one_of(st.none(), st.none(), st.none(), RAW),
        content_type=st.sampled_from(["application/json"] * 6 + ["text/plain", "application/x-www-form-urlencoded"]),
    )
    def one(role, path, body, raw, content_type):
        before = world.snapshot()
        response = world.call(role, method, path, body, raw=raw, content_type=content_type)
        assert response.status_code < 500
        if response.status_code >= 400:
            world.refused += 1
            allowed, after = applied_items(response), world.snapshot()
            unexpected = {
                c: [i for i in d if i not in allowed(before, after, c)] for c, d in changed(before, after).items()
            }
            unexpected = {c: d for c, d in unexpected.items() if d}
            assert not unexpected, "%s: %s %s %s -> %s changed %s: %s" % (
                label,
                method,
                path,
                json.dumps(body, default=str)[:500],
                response.status_code,
                unexpected,
                response.get_data(as_text=True)[:500],
            )

    one()


def applied_items(response):
    """For a multi-item answer refused as a whole, the items it did apply
    (and what they touch: the tasks named in their continuations)."""
    body = response.get_json(silent=True) or {}
    items = body.get("_items") if isinstance(body, dict) else None
    applied = [i for i in items or [] if isinstance(i, dict) and i.get("_status") == "OK"]

    def allowed(before, after, collection):
        if collection != "tasks" or not applied:
            return set()
        ok = set()
        for item in applied:
            tid = str(item.get("_id"))
            ok.add(tid)
            for snap in (before, after):
                ok.update(str(c) for c in (snap["tasks"].get(tid) or {}).get("continuations") or [])
        return ok

    return allowed


# -- the endpoints ---------------------------------------------------------------------------


@pytest.fixture
def world(store):
    return World(store)


@pytest.mark.slow
def test_fuzz_post_tasks(world):
    run_fuzz(
        world,
        "POST",
        lambda ids: st.just("/tasks"),
        lambda ids: task_documents(ids) | st.lists(task_documents(ids), max_size=3),
        "POST /tasks",
    )
    world_record(world)


@pytest.mark.slow
def test_fuzz_patch_task(world):
    run_fuzz(world, "PATCH", lambda ids: ids.map(lambda i: "/tasks/%s" % i), task_documents, "PATCH /tasks/<id>")
    world_record(world)


@pytest.mark.slow
def test_fuzz_bulk_patch(world):
    def items(ids):
        return st.lists(
            st.tuples(ids, task_documents(ids)).map(lambda t: dict(t[1], _id=t[0]) if isinstance(t[1], dict) else t[1]),
            max_size=3,
        ) | json_values(ids)

    run_fuzz(world, "PATCH", lambda ids: st.just("/tasks"), items, "PATCH /tasks")
    world_record(world)


@pytest.mark.parametrize("name", WRITABLE_VIRTUAL)
@pytest.mark.slow
def test_fuzz_virtual_resource_level(world, name):
    key = "value" if VIRTUAL[name]["kind"] == "alias" else "values"
    values = field_values(world_ids(world))[name]

    def bodies(ids):
        group = st.fixed_dictionaries(
            {},
            optional={
                "targets": st.lists(ids, max_size=3) | json_values(ids),
                key: values,
                "values": values,
                "value": values,
            },
        )
        return st.lists(group | json_values(ids), max_size=3) | json_values(ids)

    run_fuzz(world, "POST", lambda ids: st.just("/tasks/%s" % name), bodies, "POST /tasks/%s" % name)
    world_record(world)


@pytest.mark.parametrize("name", WRITABLE_VIRTUAL + READONLY_VIRTUAL)
@pytest.mark.slow
def test_fuzz_virtual_item_level(world, name):
    values = field_values(world_ids(world))[name]
    run_fuzz(
        world,
        "POST",
        lambda ids: ids.map(lambda i: "/tasks/%s/%s" % (i, name)),
        lambda ids: values,
        "POST /tasks/<id>/%s" % name,
    )
    world_record(world)


def test_fuzz_readonly_virtual_is_not_writable(world):
    for name in READONLY_VIRTUAL:
        r = world.call("admin", "POST", "/tasks/%s" % name, [{"targets": world.all_ids[:1], "value": 1}])
        assert r.status_code == 405
        r = world.call("admin", "PATCH", "/tasks/%s" % world.all_ids[0], {name: {"attempt": 9}})
        assert 400 <= r.status_code < 500


@pytest.mark.slow
def test_fuzz_worker_endpoints(world):
    def paths(ids):
        wids = st.just(world.wid) | ids
        return (
            st.just("/workers")
            | wids.map(lambda w: "/workers/%s/claim" % w)
            | wids.map(lambda w: "/workers/%s/heartbeat" % w)
            | ids.map(lambda i: "/tasks/%s/finish" % i)
        )

    def bodies(ids):
        anything = json_values(ids)
        numbers = st.integers(-2, 10) | st.floats(allow_nan=True) | anything
        resources = st.fixed_dictionaries({}, optional={"cores": numbers, "memory": numbers, "gpus": numbers})
        entry = st.fixed_dictionaries(
            {},
            optional={
                "attempt": numbers,
                "usage": st.dictionaries(st.text(max_size=5), numbers, max_size=2) | anything,
                "progress": st.fixed_dictionaries({}, optional={"fraction": numbers, "message": anything}) | anything,
            },
        )
        return (
            st.fixed_dictionaries({}, optional={"host": st.text(max_size=10) | anything, "resources": resources})
            | st.fixed_dictionaries(
                {}, optional={"free": resources | anything, "max_tasks": numbers, "wait": st.floats(0, 0.01) | anything}
            )
            | st.fixed_dictionaries({}, optional={"tasks": st.dictionaries(ids, entry | anything, max_size=2)})
            | st.fixed_dictionaries(
                {},
                optional={
                    "attempt": numbers,
                    "outcome": st.sampled_from(
                        ["success", "failure", "timeout", "cancelled", "abandoned (worker unreachable)"]
                    )
                    | anything,
                    "exit_code": numbers,
                    "stdout": anything,
                    "stderr": anything,
                    "usage": anything,
                },
            )
            | anything
        )

    run_fuzz(world, "POST", paths, bodies, "worker endpoints")
    world_record(world)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.slow
def test_every_field_takes_every_edge_value(world, method):
    """Deterministic companion of the fuzz: each task field (virtual ones
    included, and a nested resource) set to each edge value, alone in an
    otherwise valid request."""
    inactive = world.ids["user"][6]
    fields = (
        FIELDS
        + sorted(VIRTUAL)
        + ["requested_resources.cores", "requested_resources.memory", "environment.X", "unknown"]
    )
    for field in fields:
        for value in EDGE_VALUES:
            if "." in field:
                outer, inner = field.split(".")
                change = {outer: {inner: value}}
            else:
                change = {field: value}
            body = dict({"name": "n", "command": "true"}, **change) if method == "POST" else change
            path = "/tasks" if method == "POST" else "/tasks/" + inactive
            send_checked(world, "user", method, path, body)
    if method == "POST":
        # the worker endpoints, each number and name in turn
        running = world.db.tasks.find_one({"state": "running"})["_id"]
        templates = [
            ("/workers", lambda v: {"host": "h", "resources": {"cores": v}}),
            ("/workers", lambda v: {"host": "h", "resources": {"memory": v}}),
            ("/workers", lambda v: {"host": v}),
            ("/workers/%s/claim" % world.wid, lambda v: {"free": {"gpus": v}, "wait": 0}),
            ("/workers/%s/claim" % world.wid, lambda v: {"free": {"cores": 1}, "max_tasks": v}),
            (
                "/workers/%s/heartbeat" % world.wid,
                lambda v: {"tasks": {str(running): {"attempt": 1, "usage": {"max_rss": v}}}},
            ),
            (
                "/workers/%s/heartbeat" % world.wid,
                lambda v: {"tasks": {str(running): {"attempt": 1, "progress": {"fraction": 0.5, "message": v}}}},
            ),
            ("/tasks/%s/finish" % running, lambda v: {"attempt": v, "outcome": "failure"}),
            (
                "/tasks/%s/finish" % running,
                lambda v: {"attempt": 99, "outcome": "failure", "exit_code": v, "stdout": v},
            ),
        ]
        for path, template in templates:
            for value in EDGE_VALUES:
                send_checked(world, "worker", "POST", path, template(value))
    world_record(world)


def send_checked(world, role, method, path, body):
    before = world.snapshot()
    r = world.call(role, method, path, body)
    if r.status_code >= 400:
        world.refused += 1
        assert changed(before, world.snapshot()) == {}, (method, path, body, r.status_code)
    return r


def world_record(world):
    assert world.refused > 0  # the fuzz reached the validation paths
    FUZZED["requests"] += world.requests
    FUZZED["refused"] += world.refused
    record(
        "fuzz",
        fuzzed="%d requests (%d refused with 4xx), 0 answered 500, 0 changes on a 4xx"
        % (FUZZED["requests"], FUZZED["refused"]),
        load="%d examples per endpoint" % EXAMPLES,
        lost=0,
        duplicates="-",
    )


FUZZED = {"requests": 0, "refused": 0}


# -- query strings: where, projection, sort ------------------------------------------------

from banyan.server.query import ALLOWED_OPERATORS, REASONS  # noqa: E402 (the query section's own)

#: Every GET that takes a filter (and the paging and shaping of `/tasks`).
QUERY_ENDPOINTS = [
    "/tasks",
    "/tasks/current_history",
    "/tasks/rank",
    "/stats",
    "/metrics",
    "/workers",
    "/stats/workers",
]
OPERATORS = sorted(ALLOWED_OPERATORS) + sorted(REASONS) + ["$text", "$near", "$jsonSchema", "$comment", "$foo"]
QUERY_KEYS = st.sampled_from(
    FIELDS
    + sorted(VIRTUAL)
    + OPERATORS
    + [
        "_id",
        "host",
        "state",
        "resources.cores",
        "history.exit_status",
        "requested_resources.memory",
        "owner",
        "token_id",
        "a.b",
        "",
        "$",
        ".",
    ]
) | st.text(max_size=8)


def filters(ids):
    leaves = LEAVES | ids | st.sampled_from(OPERATORS)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(QUERY_KEYS, inner, max_size=3),
        max_leaves=10,
    )


def query_strings(ids):
    as_json = lambda s: s.map(lambda v: json.dumps(v, default=str))  # noqa: E731
    text = st.text(max_size=30) | st.sampled_from(['name=="x"', "priority>1", "{", "[[", "null", "1e400", "NaN"])
    where = as_json(filters(ids)) | text
    projection = (
        as_json(st.dictionaries(QUERY_KEYS, st.sampled_from([0, 1, -1, 2, True, "1", None, {}]), max_size=3)) | text
    )
    sort = (
        as_json(st.lists(st.lists(QUERY_KEYS | st.integers(-2, 2), max_size=3), max_size=3))
        | st.sampled_from(["-name", "name,-priority", "-", ",", "$where", "history.0"])
        | text
    )
    number = st.integers(-3, 10**6).map(str) | text
    return st.fixed_dictionaries(
        {},
        optional={
            "where": where,
            "projection": projection,
            "sort": sort,
            "page": number,
            "max_results": number,
            "state": text,
        },
    )


def _refused_operator(where):
    """The operator the server must refuse in `where` (JSON text), if any."""
    from banyan.server.query import first_refused

    try:
        parsed = json.loads(where) if where else None
    except ValueError:
        return None
    return first_refused(parsed) if isinstance(parsed, dict) else None


@pytest.mark.slow
def test_fuzz_query_strings(world):
    """`where`, `projection`, `sort` and paging on every GET that takes
    them: never a 500, never a change, a refused operator named in the
    400, and a user's answers never show another user's tasks."""
    ids = world_ids(world)
    mine = set(world.ids["user"])

    @settings(
        max_examples=EXAMPLES * 3,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(role=ROLES, path=st.sampled_from(QUERY_ENDPOINTS), query=query_strings(ids))
    def one(role, path, query):
        before = world.snapshot()
        headers = {"Authorization": "Bearer " + world.tokens[role]} if world.tokens.get(role) else {}
        world.requests += 1
        response = world.client.get(path, query_string=query, headers=headers)
        assert response.status_code < 500
        assert changed(before, world.snapshot()) == {}, (path, query)
        operator = _refused_operator(query.get("where")) if path != "/stats/workers" and role != "anonymous" else None
        if operator is not None:  # the allow-list, whatever else is wrong with the request
            assert response.status_code == 400, (path, query, response.status_code)
        if response.status_code >= 400:
            world.refused += 1
            message = (response.get_json(silent=True) or {}).get("_error", {}).get("message", "")
            if operator is not None and set(query) == {"where"}:  # (else another mistake may be named first)
                assert "may not use %s" % operator in message, (path, query, message)
            return
        if role != "user" or path == "/metrics":
            return
        body = response.get_json()
        if path.startswith("/tasks"):
            shown = {item["_id"] for item in body["_items"] if "_id" in item}
            assert shown <= mine, (path, query, shown - mine)
        elif path == "/workers":
            shown = {t for w in body["_items"] for t in w["running"]}
            assert shown <= mine, (path, query, shown - mine)

    one()
    world_record(world)
