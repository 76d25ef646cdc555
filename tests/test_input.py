"""Bad input and small leaks (issue 21): refused query operators on every
endpoint that takes `where`, other users' tasks hidden in `/workers`, dates
in ISO 8601, sizes and durations refused with a message."""

import json
import re

import pytest
from test_auth import bearer, sapi, sdb, secure_app, snapshot, tokens  # noqa: F401 (fixtures)

from banyan.server.query import ALLOWED_OPERATORS

FREE = {"cores": 8, "memory": 1 << 34, "gpus": 0}

#: Every GET endpoint that takes `where`.
WHERE_ENDPOINTS = ["/tasks", "/tasks/current_history", "/tasks/rank", "/stats", "/metrics", "/workers"]

REFUSED = [
    ({"$expr": {"$eq": ["$state", "running"]}}, "$expr"),
    ({"name": {"$regex": "^a"}}, "$regex"),
    ({"$where": "this.name == 'a'"}, "$where"),
    ({"name": {"$not": {"$regex": "a"}}}, "$regex"),
    ({"$and": [{"state": "running"}, {"$function": {"body": "x", "args": [], "lang": "js"}}]}, "$function"),
    ({"$text": {"$search": "a"}}, "$text"),
    ({"history": {"$elemMatch": {"$expr": True}}}, "$expr"),
]


@pytest.mark.parametrize("role", ["admin", "user", "worker"])
@pytest.mark.parametrize("endpoint", WHERE_ENDPOINTS)
@pytest.mark.slow
def test_refused_operators_answer_400_naming_them(sapi, sdb, tokens, endpoint, role):
    before = snapshot(sdb)
    for where, operator in REFUSED:
        r = sapi.get(endpoint, query_string={"where": json.dumps(where)}, headers=bearer(tokens[role]))
        assert r.status_code == 400, (endpoint, where, r.status_code, r.data[:300])
        message = r.json["_error"]["message"]
        assert "may not use %s" % operator in message, message
        assert "$in" in message  # and says what is allowed
    assert snapshot(sdb) == before


def test_allowed_operators_work_on_every_endpoint(sapi, tokens):
    admin = bearer(tokens["admin"])
    r = sapi.post("/tasks", json={"command": "true", "name": "a", "priority": 3}, headers=admin)
    assert r.status_code == 201
    where = {
        "$or": [{"name": {"$in": ["a", "b"]}}, {"priority": {"$gte": 5}}],
        "history": {"$size": 0},
        "name": {"$exists": True, "$not": {"$eq": "c"}},
    }
    for endpoint in WHERE_ENDPOINTS:
        if endpoint == "/workers":
            where = {"$or": [{"host": {"$in": ["a", "b"]}}, {"resources.cores": {"$gte": 5}}]}
        r = sapi.get(endpoint, query_string={"where": json.dumps(where)}, headers=admin)
        assert r.status_code == 200, (endpoint, r.data[:300])
    where = {"name": {"$in": ["a", "b"]}, "history": {"$size": 0}}
    assert sapi.get("/tasks", query_string={"where": json.dumps(where)}, headers=admin).json["_meta"]["total"] == 1
    assert sapi.get("/stats", query_string={"where": json.dumps(where)}, headers=admin).json["total"] == 1
    assert {"$eq", "$in", "$and", "$or", "$not", "$exists", "$size", "$elemMatch"} <= ALLOWED_OPERATORS


@pytest.mark.parametrize("endpoint", WHERE_ENDPOINTS)
def test_unparsable_where_says_what_is_accepted(sapi, tokens, endpoint):
    for where in ("{not json", "[1, 2]", "42"):
        r = sapi.get(endpoint, query_string={"where": where}, headers=bearer(tokens["admin"]))
        assert r.status_code == 400, (endpoint, where)
        assert "'where'" in r.json["_error"]["message"]


def test_workers_can_be_filtered(sapi, tokens):
    worker = bearer(tokens["worker"])
    for host in ("n1", "n2"):
        assert sapi.post("/workers", json={"host": host, "resources": FREE}, headers=worker).status_code == 201
    r = sapi.get("/workers", query_string={"where": json.dumps({"host": "n2"})}, headers=worker)
    assert [w["host"] for w in r.json["_items"]] == ["n2"]
    r = sapi.get("/workers", query_string={"where": json.dumps({"token_id": "x"})}, headers=worker)
    assert r.status_code == 400 and "token_id" in r.json["_error"]["message"]


def test_workers_show_a_user_only_their_own_running_tasks(sapi, tokens):
    worker, alice, bob = bearer(tokens["worker"]), bearer(tokens["user"]), bearer(tokens["other-user"])
    wid = sapi.post("/workers", json={"host": "n1", "resources": FREE}, headers=worker).json["_id"]
    mine = sapi.post("/tasks", json={"command": "sleep 9", "state": "available"}, headers=alice).json["_id"]
    theirs = sapi.post("/tasks", json={"command": "sleep 9", "state": "available"}, headers=bob).json["_id"]
    claimed = sapi.post("/workers/%s/claim" % wid, json={"free": FREE, "max_tasks": 2}, headers=worker).json
    assert {t["_id"] for t in claimed["_items"]} == {mine, theirs}
    for path in ("/workers", "/workers/%s" % wid):
        for who, expected in (
            (alice, [mine]),
            (bob, [theirs]),
            (worker, sorted([mine, theirs])),
            (bearer(tokens["admin"]), sorted([mine, theirs])),
        ):
            r = sapi.get(path, headers=who)
            doc = r.json["_items"][0] if "_items" in r.json else r.json
            assert sorted(doc["running"]) == expected, (path, doc["running"])


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def test_token_dates_are_iso_8601(sapi, tokens):
    admin = bearer(tokens["admin"])
    made = sapi.post("/tokens", json={"role": "user", "name": "carol"}, headers=admin)
    assert made.status_code == 201 and ISO.match(made.json["created"]), made.json
    items = sapi.get("/tokens", query_string={"revoked": "1"}, headers=admin).json["_items"]
    assert all(ISO.match(t["created"]) for t in items)
    assert any(t["revoked"] and ISO.match(t["revoked"]) for t in items)
    revoked = sapi.delete("/tokens/carol", headers=admin).json["_items"]
    assert all(ISO.match(t["revoked"]) for t in revoked)


# -- sizes and durations, through the API -------------------------------------

UNITS = [
    ("2 GiB", 2 << 30),
    ("2G", 2 << 30),
    ("2g", 2 << 30),
    ("2 GB", 2 * 10**9),
    ("2 kB", 2000),
    ("512 MiB", 512 << 20),
    ("10B", 10),
    (1024, 1024),
]


@pytest.mark.parametrize("written, stored", UNITS)
def test_memory_sizes_as_documented(api, written, stored):
    r = api.post("/tasks", json={"command": "true", "requested_resources": {"memory": written}})
    assert r.status_code == 201, r.json
    assert api.get("/tasks/%s" % r.json["_id"]).json["requested_resources"]["memory"] == stored


@pytest.mark.parametrize("bits", ["2Gb", "2 gb", "512mb", "8b"])
def test_sizes_in_bits_are_refused_and_store_nothing(api, db, bits):
    r = api.post("/tasks", json={"command": "true", "requested_resources": {"memory": bits}})
    assert r.status_code == 422
    assert "lower-case 'b' means bits" in json.dumps(r.json["_issues"])
    assert db.tasks.count_documents({}) == 0
    wid = api.post("/workers", json={"host": "n", "resources": {"cores": 1, "memory": bits}})
    assert wid.status_code == 422 and "means bits" in wid.json["_error"]["message"]


@pytest.mark.parametrize("limit", [0, -5, 0.0])
def test_time_limit_must_be_positive(api, db, limit):
    r = api.post("/tasks", json={"command": "true", "time_limit": limit})
    assert r.status_code == 422, r.json
    assert "time_limit" in r.json["_issues"]
    assert db.tasks.count_documents({}) == 0
    assert api.post("/tasks", json={"command": "true", "time_limit": None}).status_code == 201
    assert api.post("/tasks", json={"command": "true", "time_limit": 0.5}).status_code == 201


def test_release_hands_back_only_what_the_registration_holds(api, db):
    wid = api.post("/workers", json={"host": "n", "resources": FREE}).json["_id"]
    tid = api.post("/tasks", json={"command": "true", "state": "available"}).json["_id"]
    assert [t["_id"] for t in api.post("/workers/%s/claim" % wid, json={"free": FREE}).json["_items"]] == [tid]
    before = snapshot(db)
    for body in (
        {},
        {"tasks": []},
        {"tasks": [{"_id": "nope", "attempt": 1}]},
        {"tasks": [{"_id": tid}]},
        {"tasks": [{"_id": tid, "attempt": 1, "x": 1}]},
        {"tasks": "all"},
    ):
        r = api.post("/workers/%s/release" % wid, json=body)
        assert r.status_code == 422, (body, r.json)
    assert api.post("/workers/%s/release" % wid, data="x").status_code == 400
    assert snapshot(db) == before
    assert api.post("/workers/%s/release" % wid, json={"tasks": [{"_id": tid, "attempt": 2}]}).json == {"released": []}
    released = api.post("/workers/%s/release" % wid, json={"tasks": [{"_id": tid, "attempt": 1}]}).json
    assert released == {"released": [tid]}
    task = api.get("/tasks/%s" % tid).json
    assert task["state"] == "available" and task["retry_count"] == 0


def test_a_worker_releases_only_under_its_own_registrations(sapi, tokens):
    worker = bearer(tokens["worker"])
    wid = sapi.post("/workers", json={"host": "n", "resources": FREE}, headers=worker).json["_id"]
    body = {"tasks": [{"_id": "0123456789abcdef01234567", "attempt": 1}]}
    assert sapi.post("/workers/%s/release" % wid, json=body, headers=bearer(tokens["user"])).status_code == 403
    assert sapi.post("/workers/%s/release" % wid, json=body, headers=worker).status_code == 200


@pytest.mark.parametrize("path", ["/tasks", "/jobs"])
def test_a_body_that_is_no_document_is_refused(api, db, path):
    tid = api.post("/tasks", json={"command": "true"}).json["_id"]
    before = snapshot(db)
    for body in ("1.5e18", "3", '"text"', "true"):
        r = api.post(path, data=body, content_type="application/json")
        assert r.status_code == 400 and "must be a JSON object" in r.json["_error"]["message"], (body, r.json)
    r = api.patch("/tasks/%s" % tid, data="[1]", content_type="application/json")
    assert r.status_code == 400
    assert snapshot(db) == before
