"""Strings holding a NUL character ("\\u0000"): one rule on every store.

PostgreSQL, under FerretDB, cannot store or match such a string, and the
answer must not depend on the store: whatever a client sends to be stored or
matched is refused with a 4xx naming the field, and nothing changes; a
task's output, which may hold any bytes, is kept (as bytes) and read back
exactly. Runs on the embedded store and, with BANYAN_TEST_MONGO_URI, on the
database.
"""

import base64

import pytest
from bson import ObjectId
from test_claims import claim_one, finish, heartbeat, register, submit

from banyan.server.states import SUCCESS


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "a\x00b", "command": "true"}, "name"),
        ({"command": ["echo", "\x00"]}, "command"),
        ({"command": "true", "environment": {"X": "1\x002"}}, "environment"),
        ({"command": "true", "working_directory": "/tmp/\x00"}, "working_directory"),
    ],
)
def test_a_task_with_a_nul_in_a_string_is_refused_naming_the_field(api, db, body, field):
    r = api.post("/tasks", json=[{"command": "true", "name": "fine"}, body])
    assert r.status_code == 422, r.json
    assert "NUL" in str(r.json) and field in str(r.json), r.json
    assert db.tasks.count_documents({}) == 0
    r = api.post("/jobs", json={"name": "x\x00"})
    assert r.status_code == 422 and "NUL" in str(r.json), r.json


def test_a_patch_with_a_nul_changes_nothing(api, db):
    (tid,) = submit(api, {"command": "true", "name": "before"})
    r = api.patch("/tasks/%s" % tid, json={"priority": 3, "name": "\x00"})
    assert r.status_code == 422 and "name" in str(r.json), r.json
    assert db.tasks.find_one({"_id": ObjectId(tid)}, {"name": 1, "priority": 1})["name"] == "before"
    assert api.patch("/tasks/%s" % tid, json={"priority": 3}).status_code == 200


def test_a_filter_matching_a_nul_is_refused(api):
    submit(api, {"command": "true", "name": "a"})
    for where in ('{"name": "a\\u0000"}', '{"name": {"$in": ["b", "\\u0000"]}}'):
        for path in ("/tasks", "/stats", "/workers"):
            r = api.get(path, query_string={"where": where})
            assert r.status_code == 400 and "NUL" in r.json["_error"]["message"], (path, r.json)
    assert api.delete("/tokens/no%00such").status_code == 404


def test_worker_strings_with_a_nul_are_refused(api, db):
    r = api.post("/workers", json={"host": "node\x001", "resources": {"cores": 1}})
    assert r.status_code == 422 and "host" in str(r.json), r.json
    assert db.workers.count_documents({}) == 0
    (tid,) = submit(api, {"command": "true", "state": "available"})
    wid = register(api)
    attempt = claim_one(api, wid, tid)
    before = db.tasks.find_one({"_id": ObjectId(tid)})
    r = api.post(
        "/workers/%s/heartbeat" % wid,
        json={"tasks": {tid: {"attempt": attempt, "progress": {"fraction": 0.5, "message": "half\x00"}}}},
    )
    assert r.status_code == 422 and "message" in str(r.json), r.json
    r = api.post("/workers/%s/heartbeat" % wid, json={"tasks": {tid: {"attempt": attempt, "usage": {"a\x00": 1}}}})
    assert r.status_code == 422 and "usage" in str(r.json), r.json
    assert db.tasks.find_one({"_id": ObjectId(tid)}) == before


def test_output_holding_nul_characters_is_kept_and_read_back(api):
    (tid,) = submit(api, {"command": "true", "state": "available"})
    wid = register(api)
    attempt = claim_one(api, wid, tid)
    live = {"stdout_base64": base64.b64encode(b"so far\x00").decode(), "stderr_base64": ""}
    heartbeat(api, wid, {tid: {"attempt": attempt, "output": live}})
    logs = api.get("/tasks/%s/logs" % tid).json
    assert base64.b64decode(logs["stdout_base64"]) == b"so far\x00" and logs["stdout"] == "so far\x00", logs
    # as text (what the worker sends for UTF-8) and as bytes
    finish(api, tid, attempt, SUCCESS, 0, stdout="a\x00b\n", stderr_base64=base64.b64encode(b"\x00").decode())
    logs = api.get("/tasks/%s/logs" % tid).json
    assert (logs["stdout"], logs["stderr"]) == ("a\x00b\n", "\x00"), logs
    assert base64.b64decode(logs["stdout_base64"]) == b"a\x00b\n"
    assert base64.b64decode(logs["stderr_base64"]) == b"\x00"
