"""Tokens, roles and permissions: who may do what, over HTTP and from the CLI."""

import base64
import json
import os
import stat
import subprocess
import sys

import pytest
import requests
from bson import ObjectId
from conftest import MONGO_URI, LiveServer, live_mongo_uri, make_app
from flask import Blueprint, jsonify

from banyan.server.auth import TOKEN_PREFIX, TokenStore, hash_token, owner_filter, require_role
from banyan.server.identity import current_identity

# -- an app with authentication on ------------------------------------------


@pytest.fixture
def secure_app(store):
    return make_app(store, AUTH=True)


@pytest.fixture
def sapi(secure_app):
    return secure_app.test_client()


@pytest.fixture
def sdb(secure_app, store):
    client, dbname = store
    return client[dbname]


@pytest.fixture
def tokens(sdb):
    """One token per role (two users), plus a revoked one."""
    store = TokenStore(sdb)
    made = {
        "admin": store.create("admin", "root")[1],
        "user": store.create("user", "alice")[1],
        "other-user": store.create("user", "bob")[1],
        "worker": store.create("worker", "node1")[1],
        "revoked": store.create("user", "mallory")[1],
        "bad-token": TOKEN_PREFIX + "not-a-real-token",
    }
    store.revoke("mallory")
    return made


def bearer(token):
    return {"Authorization": "Bearer %s" % token} if token else {}


def basic(token, password=""):
    raw = base64.b64encode(("%s:%s" % (token, password)).encode()).decode()
    return {"Authorization": "Basic %s" % raw}


def snapshot(db):
    """Everything stored, to show that a refused request changed nothing."""
    return {
        name: sorted(repr(sorted(d.items())) for d in db[name].find()) for name in sorted(db.list_collection_names())
    }


def make_task(api, token, **body):
    r = api.post("/tasks", json=dict({"command": "echo hi"}, **body), headers=bearer(token))
    assert r.status_code == 201, r.json
    return r.json["_id"]


# -- the matrix ---------------------------------------------------------------

ROLES = ("anonymous", "bad-token", "revoked", "admin", "user", "other-user", "worker")
UNAUTH = {"anonymous": 401, "bad-token": 401, "revoked": 401}


def expect(admin, user, other_user, worker):
    return dict(UNAUTH, admin=admin, user=user, worker=worker, **{"other-user": other_user})


WORKER_ID = str(ObjectId())
PUBLIC = {role: 200 for role in ROLES}
FREE = {"cores": 64, "memory": 1 << 40, "gpus": 8}

#: (what, method, path, body, expected status per role). `{inactive}`,
#: `{available}`, `{child}` and `{running}` are tasks of the user "alice"
#: (role `user`); "bob" (`other-user`) is another user; `{wid}` is the
#: worker registered with the `worker` token, running `{running}`
#: (attempt 1); `{spare}` is a token any admin may revoke.
ENDPOINTS = [
    ("api home", "GET", "/", None, expect(200, 200, 200, 200)),
    # tasks (Eve)
    ("list tasks", "GET", "/tasks", None, expect(200, 200, 200, 200)),
    ("create a task", "POST", "/tasks", {"command": "echo new"}, expect(201, 201, 201, 403)),
    ("create tasks in bulk", "POST", "/tasks", [{"command": "a"}, {"command": "b"}], expect(201, 201, 201, 403)),
    ("read a task", "GET", "/tasks/{inactive}", None, expect(200, 200, 404, 200)),
    ("change a task", "PATCH", "/tasks/{inactive}", {"priority": 7}, expect(200, 200, 404, 403)),
    ("make a task available", "PATCH", "/tasks/{inactive}", {"state": "available"}, expect(200, 200, 404, 403)),
    ("cancel a task", "PATCH", "/tasks/{available}", {"state": "cancelled"}, expect(200, 200, 404, 403)),
    ("cancel a running task", "PATCH", "/tasks/{running}", {"state": "cancelled"}, expect(200, 200, 404, 403)),
    (
        "claim a task (seed protocol)",
        "PATCH",
        "/tasks/{available}",
        {"state": "running", "worker": "{wid}"},
        expect(200, 403, 404, 200),
    ),
    (
        "set the worker field without a claim",
        "PATCH",
        "/tasks/{inactive}",
        {"worker": WORKER_ID},
        expect(422, 403, 404, 403),
    ),
    ("bulk PATCH", "PATCH", "/tasks", [{"_id": "{inactive}", "priority": 3}], expect(200, 200, 404, 403)),
    # virtual resources
    (
        "add continuations (item)",
        "POST",
        "/tasks/{inactive}/add_continuations",
        ["{child}"],
        expect(200, 200, 404, 403),
    ),
    (
        "add continuations (resource)",
        "POST",
        "/tasks/add_continuations",
        [{"targets": ["{inactive}"], "values": ["{child}"]}],
        expect(200, 200, 404, 403),
    ),
    (
        "add continuations (PATCH field)",
        "PATCH",
        "/tasks/{inactive}",
        {"add_continuations": ["{child}"]},
        expect(200, 200, 404, 403),
    ),
    (
        "remove continuations (item)",
        "POST",
        "/tasks/{parent}/remove_continuations",
        ["{child}"],
        expect(200, 200, 404, 403),
    ),
    ("current history (gather)", "GET", "/tasks/current_history", None, expect(200, 200, 200, 200)),
    ("rank (gather)", "GET", "/tasks/rank", None, expect(200, 200, 200, 200)),
    ("rank (item)", "POST", "/tasks/{inactive}/rank", 5, expect(200, 200, 404, 403)),
    ("rank (resource)", "POST", "/tasks/rank", [{"targets": ["{inactive}"], "value": 5}], expect(200, 200, 404, 403)),
    # workers, claims, history writes
    ("register a worker", "POST", "/workers", {"host": "n2", "resources": FREE}, expect(201, 403, 403, 201)),
    ("list workers", "GET", "/workers", None, expect(200, 200, 200, 200)),
    ("show a worker", "GET", "/workers/{wid}", None, expect(200, 200, 200, 200)),
    ("claim tasks", "POST", "/workers/{wid}/claim", {"free": FREE, "max_tasks": 4}, expect(200, 403, 403, 200)),
    (
        "heartbeat (writes history)",
        "POST",
        "/workers/{wid}/heartbeat",
        {"tasks": {"{running}": {"attempt": 1, "progress": {"fraction": 0.5, "message": "half"}}}},
        expect(200, 403, 403, 200),
    ),
    (
        "finish an attempt (writes history)",
        "POST",
        "/tasks/{running}/finish",
        {"attempt": 1, "outcome": "success", "exit_code": 0, "stdout": "out", "stderr": ""},
        expect(200, 403, 403, 200),
    ),
    ("read logs", "GET", "/tasks/{running}/logs", None, expect(200, 200, 404, 200)),
    ("unregister a worker", "DELETE", "/workers/{wid}", None, expect(204, 403, 403, 204)),
    # statistics
    ("statistics", "GET", "/stats", None, expect(200, 200, 200, 200)),
    ("worker statistics", "GET", "/stats/workers", None, expect(200, 200, 200, 200)),
    ("metrics", "GET", "/metrics", None, expect(200, 200, 200, 200)),
    ("dashboard page (no data in it)", "GET", "/dashboard", None, PUBLIC),
    # tokens
    ("list tokens", "GET", "/tokens", None, expect(200, 403, 403, 403)),
    ("create a token", "POST", "/tokens", {"role": "user", "name": "carol"}, expect(201, 403, 403, 403)),
    ("revoke a token", "DELETE", "/tokens/{spare}", None, expect(200, 403, 403, 403)),
]


def fill(value, names):
    """`value` with every "{name}" string replaced by the matrix's ids."""
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    if isinstance(value, dict):
        return {fill(k, names): fill(v, names) for k, v in value.items()}
    return value


@pytest.fixture
def world(sapi, sdb, tokens):
    """The objects every matrix case acts on."""
    names = {
        "inactive": make_task(sapi, tokens["user"], name="alice's"),
        "child": make_task(sapi, tokens["user"], name="alice's child"),
        "available": make_task(sapi, tokens["user"], name="alice's ready", state="available"),
        "bobs": make_task(sapi, tokens["other-user"], name="bob's"),
        "spare": TokenStore(sdb).create("user", "spare")[0]["_id"],
    }
    names["parent"] = make_task(sapi, tokens["user"], name="alice's parent", continuations=[names["child"]])
    names["running"] = make_task(sapi, tokens["user"], name="alice's running", state="available", priority=100)
    w = bearer(tokens["worker"])
    r = sapi.post("/workers", json={"host": "n1", "resources": FREE}, headers=w)
    assert r.status_code == 201, r.json
    names["wid"] = r.json["_id"]
    r = sapi.post("/workers/%s/claim" % names["wid"], json={"free": FREE, "max_tasks": 1}, headers=w)
    assert [t["_id"] for t in r.json["_items"]] == [names["running"]], r.json
    return names


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("what,method,path,body,expected", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_permission_matrix(sapi, sdb, tokens, world, role, what, method, path, body, expected):
    url, body = fill(path, world), fill(body, world)
    before = snapshot(sdb)
    r = sapi.open(url, method=method, json=body, headers=bearer(tokens.get(role)))
    assert r.status_code == expected[role], (what, role, r.status_code, r.get_data(as_text=True)[:500])
    after = snapshot(sdb)
    if r.status_code >= 400:
        assert after == before, "%s as %s was refused (%s) but changed the store" % (what, role, r.status_code)
        assert r.json["_status"] == "ERR" and r.json["_error"]["message"]
    elif method != "GET":
        assert after != before, "%s as %s answered %s but changed nothing" % (what, role, r.status_code)
    if r.status_code == 401:
        assert "Bearer" in r.headers.get("WWW-Authenticate", "")
        assert "banyan token create" in r.json["_error"]["message"]
    if role in ("user", "other-user") and r.status_code == 200 and method == "GET":
        # whatever a user reads, no task of another user is in it
        assert world["bobs" if role == "user" else "inactive"] not in r.get_data(as_text=True)


def test_workers_cannot_report_by_patch_or_touch_user_fields(sapi, sdb, tokens):
    tid = make_task(sapi, tokens["user"], state="available")
    wid = sapi.post("/workers", json={"host": "n1", "resources": FREE}, headers=bearer(tokens["worker"])).json["_id"]
    r = sapi.patch("/tasks/" + tid, json={"state": "running", "worker": wid}, headers=bearer(tokens["worker"]))
    assert r.status_code == 200, r.json
    before = snapshot(sdb)
    for change in (
        {"state": "terminated"},
        {"state": "cancelled"},
        {"name": "mine now"},
        {"state": "running", "priority": 9},
    ):
        r = sapi.patch("/tasks/" + tid, json=change, headers=bearer(tokens["worker"]))
        assert r.status_code == 403, (change, r.json)
    assert snapshot(sdb) == before


def test_a_worker_claims_only_under_its_own_worker_id(sapi, sdb, tokens):
    other = TokenStore(sdb).create("worker", "node2")[1]
    r = sapi.post("/workers", json={"host": "n2", "resources": FREE}, headers=bearer(other))
    assert r.status_code == 201, r.json
    theirs = r.json["_id"]
    tid = make_task(sapi, tokens["user"], state="available")
    before = snapshot(sdb)
    w = bearer(tokens["worker"])
    r = sapi.patch("/tasks/" + tid, json={"state": "running", "worker": theirs}, headers=w)
    assert r.status_code == 403, r.json
    r = sapi.patch("/tasks/" + tid, json={"state": "running", "worker": str(ObjectId())}, headers=w)
    assert r.status_code == 422 and "register" in r.json["_error"]["message"], r.json
    assert snapshot(sdb) == before
    r = sapi.patch("/tasks/" + tid, json={"state": "running", "worker": theirs}, headers=bearer(other))
    assert r.status_code == 200, r.json


# -- users see their own tasks; no query trick shows another's ----------------


@pytest.fixture
def two_users(sapi, tokens):
    alice = [make_task(sapi, tokens["user"], name="a%d" % i) for i in range(3)]
    bob = [make_task(sapi, tokens["other-user"], name="b%d" % i) for i in range(2)]
    return alice, bob


def listed(sapi, token, **params):
    r = sapi.get(
        "/tasks",
        query_string={k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()},
        headers=bearer(token),
    )
    return r.status_code, [t["_id"] for t in r.json.get("_items", [])]


def test_tasks_belong_to_their_user_by_name(sapi, sdb, tokens, two_users):
    alice, bob = two_users
    owners = {str(d["_id"]): d["owner"] for d in sdb.tasks.find()}
    assert {owners[t] for t in alice} == {"alice"} and {owners[t] for t in bob} == {"bob"}
    assert sorted(listed(sapi, tokens["user"])[1]) == sorted(alice)
    assert sorted(listed(sapi, tokens["other-user"])[1]) == sorted(bob)
    assert sorted(listed(sapi, tokens["admin"])[1]) == sorted(alice + bob)
    assert sorted(listed(sapi, tokens["worker"])[1]) == sorted(alice + bob)
    # a second token for the same user (a new laptop, a rotated token) sees the same tasks
    again = TokenStore(sdb).create("user", "alice")[1]
    assert sorted(listed(sapi, again)[1]) == sorted(alice)


@pytest.mark.parametrize(
    "params",
    [
        {"where": {"owner": "bob"}},
        {"where": {"owner": {"$ne": "alice"}}},
        {"where": {"$or": [{"owner": "bob"}, {"owner": "alice"}]}},
        {"where": {"$or": [{"owner": "bob"}, {"name": {"$exists": True}}]}},
        {"where": {"name": {"$in": ["b0", "b1"]}}},
        {"where": {"$and": [{"owner": "alice"}, {"owner": "bob"}]}},
        {"where": 'owner == "bob"'},
        {"projection": {"owner": 0}},
        {"projection": {"owner": 1, "name": 1}},
        {"where": {"owner": "bob"}, "projection": {"owner": 0}},
        {"max_results": 10000},
    ],
)
def test_no_where_or_projection_shows_another_users_tasks(sapi, tokens, two_users, params):
    alice, bob = two_users
    status, ids = listed(sapi, tokens["user"], **params)
    assert status == 200, status
    assert set(ids) <= set(alice), "alice saw bob's tasks with %s" % params


def test_another_users_task_is_out_of_reach(sapi, sdb, tokens, two_users):
    alice, bob = two_users
    before = snapshot(sdb)
    victim = bob[0]
    h = bearer(tokens["user"])
    assert sapi.get("/tasks/" + victim, headers=h).status_code == 404
    assert sapi.get("/tasks/" + victim, query_string={"projection": '{"owner": 0}'}, headers=h).status_code == 404
    assert sapi.patch("/tasks/" + victim, json={"state": "cancelled"}, headers=h).status_code == 404
    assert sapi.patch("/tasks/" + victim, json={"name": "x"}, headers=h).status_code == 404
    # nor through a continuation, which would make bob's task wait for alice's
    r = sapi.post("/tasks", json={"command": "x", "continuations": [victim]}, headers=h)
    assert r.status_code == 422, r.json
    # nor by claiming ownership at creation
    r = sapi.post("/tasks", json={"command": "x", "owner": "bob"}, headers=h)
    assert r.status_code == 422, r.json
    assert snapshot(sdb) == before


def test_users_chain_their_own_tasks(sapi, tokens):
    child = make_task(sapi, tokens["user"])
    parent = make_task(sapi, tokens["user"], continuations=[child])
    r = sapi.get("/tasks/" + child, headers=bearer(tokens["user"]))
    assert r.json["pending_parents"] == [parent]


# -- tokens ------------------------------------------------------------------


def test_bearer_and_basic_with_token_as_user_name(sapi, tokens):
    for headers in (
        bearer(tokens["user"]),
        basic(tokens["user"]),
        basic(tokens["user"], "ignored"),
        basic("", tokens["user"]),
        {"Authorization": "Token %s" % tokens["user"]},
    ):
        r = sapi.get("/tasks", headers=headers)
        assert r.status_code == 200, (headers, r.json)
    for headers in (
        {},
        bearer(""),
        {"Authorization": "Bearer"},
        basic("nope"),
        {"Authorization": "Basic !!!"},
        bearer(tokens["user"] + "x"),
        bearer("x" * 10000),
        bearer(tokens["revoked"]),
    ):
        r = sapi.get("/tasks", headers=headers)
        assert r.status_code == 401, (headers, r.json)


def test_revocation_takes_effect_at_once(sapi, tokens):
    r = sapi.get("/tokens", headers=bearer(tokens["admin"]))
    alice = [t for t in r.json["_items"] if t["name"] == "alice"]
    assert len(alice) == 1 and "hash" not in alice[0] and "token" not in alice[0]
    assert sapi.get("/tasks", headers=bearer(tokens["user"])).status_code == 200
    r = sapi.delete("/tokens/" + alice[0]["_id"], headers=bearer(tokens["admin"]))
    assert r.status_code == 200 and r.json["_items"][0]["revoked"]
    assert sapi.get("/tasks", headers=bearer(tokens["user"])).status_code == 401
    # revoking again, or something that does not exist, is refused
    assert sapi.delete("/tokens/" + alice[0]["_id"], headers=bearer(tokens["admin"])).status_code == 409
    assert sapi.delete("/tokens/nobody", headers=bearer(tokens["admin"])).status_code == 404


def test_token_endpoint_makes_working_tokens_and_refuses_bad_input(sapi, sdb, tokens):
    h = bearer(tokens["admin"])
    r = sapi.post("/tokens", json={"role": "worker", "name": "node7"}, headers=h)
    assert r.status_code == 201, r.json
    assert r.json["token"].startswith(TOKEN_PREFIX) and r.json["role"] == "worker"
    assert sapi.get("/tasks", headers=bearer(r.json["token"])).status_code == 200
    assert sapi.post("/tasks", json={"command": "x"}, headers=bearer(r.json["token"])).status_code == 403
    before = snapshot(sdb)
    for body, status in (
        ({"role": "god"}, 422),
        ({"role": "user", "name": "a b"}, 422),
        ({"role": "user", "name": ""}, 422),
        ({"role": "user", "extra": 1}, 422),
        ({"role": "user", "name": "root"}, 409),
        ([1, 2], 400),
        ("x", 400),
    ):
        r = sapi.post("/tokens", json=body, headers=h)
        assert r.status_code == status, (body, r.json)
    r = sapi.post("/tokens", data="{not json", content_type="application/json", headers=h)
    assert r.status_code == 400
    assert snapshot(sdb) == before


def test_no_token_is_stored_in_plain_text(sapi, sdb, store, tmp_path, tokens):
    made = dict(tokens)
    r = sapi.post("/tokens", json={"role": "user", "name": "carol"}, headers=bearer(tokens["admin"]))
    made["carol"] = r.json["token"]
    for token in made.values():
        sapi.get("/tasks", headers=bearer(token))  # used, so any per-use record is written too
    stored = json.dumps([list(sdb[c].find()) for c in sdb.list_collection_names()], default=str)
    assert hash_token(made["carol"]) in stored  # the scan does see the tokens collection
    for name, token in made.items():
        assert token not in stored, "token %s is stored in plain text" % name
        assert token[len(TOKEN_PREFIX) :] not in stored
    if not MONGO_URI:  # and not on the embedded store's files either
        files = b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tmp_path / "store") for f in fs)
        assert hash_token(made["carol"]).encode() in files
        for name, token in made.items():
            assert token.encode() not in files, "token %s is on disk in plain text" % name


# -- helpers for blueprint views ----------------------------------------------


def test_require_role_for_blueprint_views(store):
    client, dbname = store
    probe = Blueprint("probe", __name__)

    @probe.route("/probe/workers-only", methods=["POST"])
    @require_role("worker", "admin")
    def workers_only():
        identity = current_identity()
        return jsonify({"role": identity.role, "name": identity.name, "filter": owner_filter()})

    @probe.route("/probe/anyone", methods=["GET"])
    @require_role()
    def anyone():
        return jsonify({"role": current_identity().role, "filter": owner_filter()})

    app = make_app(store, AUTH=True)
    app.register_blueprint(probe)
    api = app.test_client()
    store_ = TokenStore(client[dbname])
    worker, user = store_.create("worker", "n1")[1], store_.create("user", "alice")[1]
    assert api.post("/probe/workers-only").status_code == 401
    assert api.post("/probe/workers-only", headers=bearer("junk")).status_code == 401
    assert api.post("/probe/workers-only", headers=bearer(user)).status_code == 403
    r = api.post("/probe/workers-only", headers=basic(worker))
    assert r.status_code == 200 and r.json == {"role": "worker", "name": "n1", "filter": {}}
    assert api.get("/probe/anyone").status_code == 401
    assert api.get("/probe/anyone", headers=bearer(user)).json == {"role": "user", "filter": {"owner": "alice"}}


def test_open_mode_lets_everyone_act_as_admin(api, db):
    """Authentication off (the loopback trial): no token needed anywhere."""
    r = api.post("/tasks", json={"command": "x"})
    assert r.status_code == 201
    assert db.tasks.find_one({"_id": ObjectId(r.json["_id"])})["owner"] == "open"
    r = api.post("/tokens", json={"role": "admin", "name": "first"})
    assert r.status_code == 201 and r.json["token"].startswith(TOKEN_PREFIX)
    assert api.get("/tokens").json["_items"][0]["name"] == "first"


# -- the server and the CLI -----------------------------------------------------


def banyan(*args, timeout=60, env=None):
    return subprocess.run(
        [sys.executable, "-m", "banyan.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
def test_server_beyond_loopback_without_auth_refuses_to_start(tmp_path):
    for extra in (
        ["--host", "0.0.0.0", "--no-auth"],
        ["--host", "::", "--no-auth"],
        ["--host", "127.0.0.1", "--no-auth", "--mongo-uri", "mongodb://127.0.0.1:9/x"],
    ):
        out = banyan("server", "--port", "0", "--data-dir", str(tmp_path / "d"), *extra)
        assert out.returncode == 2, (extra, out)
        assert "refusing to start without authentication" in out.stderr
        assert "Drop --no-auth" in out.stderr and "--host 127.0.0.1" in out.stderr
        assert "listening" not in out.stdout
    assert not (tmp_path / "d").exists()  # refused before touching the store


def test_server_beyond_loopback_starts_with_auth_and_an_admin_token(tmp_path):
    server = LiveServer(tmp_path / "data", ["--host", "0.0.0.0"]).start()
    try:
        token_file = os.path.join(server.data_dir, "admin.token")
        if not MONGO_URI:
            assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        admin = open(token_file).read().strip()
        url = server.url
        assert requests.get(url + "/tasks").status_code == 401
        assert requests.get(url + "/tasks", headers=bearer(admin)).status_code == 200
        # curl as in the seed, with the token as user name
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", admin + ":", url + "/tasks"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout == "200"
        with open(server.data_dir + ".log") as f:
            log = f.read()
        assert "admin.token" in log and admin not in log
    finally:
        server.stop()
    assert server.server_errors() == []


def test_loopback_server_runs_open_only_on_the_embedded_store_and_says_so(live_server):
    with open(live_server.data_dir + ".log") as f:
        log = f.read()
    if MONGO_URI:  # on MongoDB, authentication is on even on loopback
        assert requests.get(live_server.url + "/tasks").status_code == 401
        assert "authentication is on" in log
    else:
        assert requests.get(live_server.url + "/tasks").status_code == 200
        assert "authentication is OFF" in log


@pytest.mark.slow
def test_token_cli_direct_then_through_the_server(tmp_path):
    data = str(tmp_path / "data")
    # directly in the store the server will serve from
    store = ["--mongo-uri", live_mongo_uri(data)] if MONGO_URI else ["--data-dir", data]
    out = banyan("token", "create", "--role", "admin", "--name", "boss", *store)
    assert out.returncode == 0, out.stderr
    admin = out.stdout.strip()
    assert admin.startswith(TOKEN_PREFIX) and "shown only now" in out.stderr
    out = banyan("token", "create", "--role", "user", "--name", "alice", *store)
    alice = out.stdout.strip()
    out = banyan("token", "list", *store)
    assert out.returncode == 0 and "boss" in out.stdout and "alice" in out.stdout
    assert admin not in out.stdout and alice not in out.stdout

    server = LiveServer(tmp_path / "data", ["--auth"]).start()
    try:
        url = server.url
        assert not os.path.exists(os.path.join(data, "admin.token"))  # an admin already existed
        assert requests.get(url + "/tasks", headers=bearer(alice)).status_code == 200
        # the embedded store is the server's now: direct access is refused with advice
        out = banyan("token", "create", "--role", "user", "--data-dir", data)
        if not MONGO_URI:
            assert out.returncode == 1 and "--server URL --token ADMIN_TOKEN" in out.stderr, out
        out = banyan("token", "create", "--role", "worker", "--name", "node1", "--server", url, "--token", admin)
        assert out.returncode == 0, out.stderr
        worker = out.stdout.strip()
        assert requests.post(url + "/tasks", json={"command": "x"}, headers=bearer(worker)).status_code == 403
        out = banyan("token", "list", "--server", url, "--token", admin)
        assert "node1" in out.stdout and worker not in out.stdout
        out = banyan("token", "revoke", "alice", "--server", url, "--token", admin)
        assert out.returncode == 0 and "revoked user token 'alice'" in out.stdout
        assert requests.get(url + "/tasks", headers=bearer(alice)).status_code == 401
        out = banyan("token", "list", "--server", url, "--token", alice)
        assert out.returncode == 1 and "401" in out.stderr
        out = banyan("token", "list", "--server", url, "--token", worker)
        assert out.returncode == 1 and "403" in out.stderr

        # no place given: the config file's server and token, else a refusal
        home = tmp_path / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BANYAN_")}
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
        out = banyan("token", "create", "--role", "user", "--name", "bob", env=env)
        assert out.returncode == 1 and "no server given" in out.stderr, out
        assert not (home / ".banyan").exists()
        (home / ".config" / "banyan").mkdir(parents=True)
        (home / ".config" / "banyan" / "config.toml").write_text('server = "%s"\ntoken = "%s"\n' % (url, admin))
        out = banyan("token", "create", "--role", "user", "--name", "bob", env=env)
        assert out.returncode == 0, out.stderr
        assert requests.get(url + "/tasks", headers=bearer(out.stdout.strip())).status_code == 200
    finally:
        server.stop()
    assert server.server_errors() == []
