"""The server core over HTTP: the task schema, states and continuations."""

import json
import subprocess

import pytest
from bson import ObjectId
from conftest import TEST_TOKEN
from conftest import get_task as get
from conftest import patch_task as patch

from banyan.server.services import services
from banyan.server.states import FAILURE, SUCCESS

GiB = 1024**3


def post(api, body, status=201):
    r = api.post("/tasks", json=body)
    assert r.status_code == status, r.json
    return r.json


def run_to_end(app, tid, outcome=SUCCESS, worker=None):
    """Claim one specific ready task as a worker would and report `outcome`."""
    worker = worker or ObjectId()
    doc = services(app).queue.tasks.find_one({"_id": ObjectId(tid)})
    assert doc["state"] == "available" and doc["pending_dependency_count"] == 0, doc
    claimed = services(app).queue.claim_next(worker, {"cores": 1e9, "memory": 1 << 60, "gpus": 1 << 30})
    assert claimed["_id"] == ObjectId(tid), "claimed %s instead of %s" % (claimed["_id"], tid)
    return services(app).queue.finish(claimed["_id"], worker, claimed["history"][-1]["attempt"], outcome)


# -- the seed's examples -------------------------------------------------


def curl(*args):
    """curl as a user runs it (with the suite's token when the server wants one)."""
    auth = ["-u", TEST_TOKEN + ":"] if TEST_TOKEN else []
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", *auth, *args], capture_output=True, text=True, check=True
    )
    body, code = out.stdout.rsplit("\n", 1)
    return int(code), json.loads(body)


def test_seed_curl_examples_verbatim(live_server):
    entry = live_server.url.split("//", 1)[1]
    code, first = curl(
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"command": "test", "requested_resources": {"memory": "1 GiB"}}',
        "http://%s/tasks" % entry,
    )
    assert code == 201, first
    tid = first["_id"]
    code, body = curl(
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"requested_resources": {"cores": 1, "memory": "1 GiB"}}',
        "http://%s/tasks/%s" % (entry, tid),
    )
    assert code == 200, body
    code, parent = curl(
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"name": "parent", "continuations": ["%s"]}' % tid,
        "http://%s/tasks" % entry,
    )
    assert code == 201, parent
    code, task = curl("http://%s/tasks/%s" % (entry, tid))
    assert code == 200
    assert task["requested_resources"]["memory"] == GiB
    assert task["requested_resources"]["cores"] == 1
    assert task["pending_dependency_count"] == 1
    assert task["pending_parents"] == [parent["_id"]]


@pytest.mark.parametrize(
    "text,expected", [("1 GiB", GiB), ("512 MiB", 512 * 1024**2), ("2GB", 2 * 10**9), (4096, 4096)]
)
def test_memory_strings_are_stored_as_bytes(api, db, text, expected):
    tid = post(api, {"command": "x", "requested_resources": {"memory": text}})["_id"]
    assert get(api, tid)["requested_resources"]["memory"] == expected
    assert db.tasks.find_one({"_id": ObjectId(tid)})["requested_resources"]["memory"] == expected


def test_defaults_and_server_fields(api):
    task = get(api, post(api, {"command": "echo hi"})["_id"])
    assert task["state"] == "inactive"
    assert task["requested_resources"] == {"cores": 1, "memory": 0, "gpus": 0}
    assert task["pending_dependency_count"] == 0 and task["retry_count"] == 0
    assert task["history"] == [] and task["exit_status"] is None and task["max_retries"] == 0


def test_bulk_post_creates_every_task(api, db):
    r = api.post("/tasks", json=[{"command": "echo %d" % i, "state": "available"} for i in range(5)])
    assert r.status_code == 201, r.json
    ids = [ObjectId(item["_id"]) for item in r.json["_items"]]
    assert db.tasks.count_documents({"_id": {"$in": ids}, "state": "available"}) == 5


def test_bulk_post_with_one_bad_task_creates_none(api, db):
    r = api.post("/tasks", json=[{"command": "ok"}, {"command": "bad", "priority": "high"}])
    assert r.status_code == 422
    assert "priority" in json.dumps(r.json)
    assert db.tasks.count_documents({}) == 0


# -- continuations ---------------------------------------------------------


def diamond(api):
    """A -> B, A -> C, B -> D, C -> D, all created inactive (children first)."""
    d = post(api, {"name": "D", "command": "d"})["_id"]
    b = post(api, {"name": "B", "command": "b", "continuations": [d]})["_id"]
    c = post(api, {"name": "C", "command": "c", "continuations": [d]})["_id"]
    a = post(api, {"name": "A", "command": "a", "continuations": [b, c]})["_id"]
    return a, b, c, d


def states_of(api, *ids):
    return [get(api, t)["state"] for t in ids]


def test_diamond_runs_d_only_after_b_and_c(app, api):
    a, b, c, d = diamond(api)
    assert get(api, d)["pending_dependency_count"] == 2
    patch(api, a, {"state": "available"})
    assert states_of(api, a, b, c, d) == ["available", "inactive", "inactive", "inactive"]
    run_to_end(app, a)
    assert states_of(api, a, b, c, d) == ["terminated", "available", "available", "inactive"]
    run_to_end(app, b)
    assert states_of(api, d) == ["inactive"]
    assert get(api, d)["pending_dependency_count"] == 1
    run_to_end(app, c)
    assert states_of(api, d) == ["available"]
    assert get(api, d)["pending_dependency_count"] == 0
    run_to_end(app, d)
    assert [get(api, t)["exit_status"] for t in (a, b, c, d)] == [SUCCESS] * 4


def test_cancelling_the_root_cancels_the_whole_diamond(api):
    a, b, c, d = diamond(api)
    patch(api, a, {"state": "available"})
    patch(api, a, {"state": "cancelled"})
    assert states_of(api, a, b, c, d) == ["cancelled"] * 4
    assert all(get(api, t)["exit_status"] == "cancelled" for t in (a, b, c, d))


def test_failure_without_retries_cancels_continuations(app, api):
    a, b, c, d = diamond(api)
    patch(api, a, {"state": "available"})
    done = run_to_end(app, a, outcome=FAILURE)
    assert done["state"] == "terminated" and done["exit_status"] == FAILURE
    assert states_of(api, b, c, d) == ["cancelled"] * 3


def test_failure_with_retries_requeues(app, api):
    tid = post(api, {"command": "x", "max_retries": 1, "state": "available"})["_id"]
    run_to_end(app, tid, outcome=FAILURE)
    task = get(api, tid)
    assert task["state"] == "available" and task["retry_count"] == 1 and len(task["history"]) == 1
    run_to_end(app, tid, outcome=FAILURE)
    task = get(api, tid)
    assert task["state"] == "terminated" and task["exit_status"] == FAILURE
    assert [h["exit_status"] for h in task["history"]] == [FAILURE, FAILURE]


def test_barrier_without_command_succeeds_when_released(app, api):
    after = post(api, {"name": "after", "command": "x"})["_id"]
    barrier = post(api, {"name": "barrier", "continuations": [after]})["_id"]
    first = post(api, {"name": "first", "command": "x", "continuations": [barrier]})["_id"]
    patch(api, first, {"state": "available"})
    run_to_end(app, first)
    assert get(api, barrier)["state"] == "terminated"
    assert get(api, barrier)["exit_status"] == SUCCESS
    assert get(api, after)["state"] == "available"


def test_barrier_submitted_available_finishes_at_once(api):
    child = post(api, {"command": "x"})["_id"]
    barrier = post(api, {"state": "available", "continuations": [child]})["_id"]
    assert get(api, barrier)["state"] == "terminated"
    assert get(api, child)["state"] == "available"


def test_available_child_waits_for_its_parents(app, api):
    child = post(api, {"command": "x"})["_id"]
    parent = post(api, {"command": "x", "continuations": [child]})["_id"]
    patch(api, child, {"state": "available"})
    assert services(app).queue.claim_next(ObjectId(), {"cores": 8, "memory": GiB, "gpus": 0}) is None
    patch(api, parent, {"state": "available"})
    run_to_end(app, parent)
    run_to_end(app, child)


def test_cancelling_running_task_waits_for_worker(app, api):
    tid = post(api, {"command": "x", "state": "available"})["_id"]
    worker = ObjectId()
    claimed = services(app).queue.claim_next(worker, {"cores": 1, "memory": 0, "gpus": 0})
    patch(api, tid, {"state": "cancelled"})
    assert get(api, tid)["state"] == "pending_cancellation"
    done = services(app).queue.finish(claimed["_id"], worker, 1, "cancelled")
    assert done["state"] == "cancelled"


# -- refusals: 4xx, a message that names the problem, nothing changed ----


def assert_refused(api, db, method, url, body, *words, status=(400, 404, 409, 422)):
    before = sorted(db.tasks.find({}), key=lambda d: d["_id"])
    r = getattr(api, method)(url, json=body)
    assert r.status_code in (status if isinstance(status, tuple) else (status,)), (r.status_code, r.json)
    text = json.dumps(r.json)
    for word in words:
        assert word in text, (word, text)
    assert sorted(db.tasks.find({}), key=lambda d: d["_id"]) == before


def test_invalid_state_changes_are_refused(app, api, db):
    tid = post(api, {"command": "x"})["_id"]
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"state": "terminated"}, "inactive", "terminated")
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"state": "sleeping"}, "unallowed value")
    assert_refused(api, db, "post", "/tasks", {"command": "x", "state": "running"}, "running")
    patch(api, tid, {"state": "available"})
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"state": "inactive"}, "available", "inactive")
    run_to_end(app, tid)
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"state": "cancelled"}, "terminated")
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"state": "available"}, "terminated")


def test_unknown_fields_are_refused(api, db):
    assert_refused(api, db, "post", "/tasks", {"command": "x", "colour": "blue"}, "colour", "unknown")
    tid = post(api, {"command": "x"})["_id"]
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"colour": "blue"}, "colour", "unknown")


def test_server_fields_are_read_only(api, db):
    assert_refused(api, db, "post", "/tasks", {"command": "x", "retry_count": 3}, "retry_count", "read-only")
    tid = post(api, {"command": "x"})["_id"]
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"pending_dependency_count": 0, "history": [1]}, "read-only")


def test_malformed_and_missing_ids_are_refused(api, db):
    assert_refused(
        api, db, "post", "/tasks", {"command": "x", "continuations": ["not-an-id"]}, "continuations", "objectid"
    )
    missing = str(ObjectId())
    assert_refused(api, db, "post", "/tasks", {"command": "x", "continuations": [missing]}, missing, "must exist")
    r = api.get("/tasks/not-an-id")
    assert r.status_code == 404
    r = api.patch("/tasks/%s" % missing, json={"name": "x"})
    assert r.status_code == 404


def test_continuation_that_is_not_inactive_is_refused(api, db):
    child = post(api, {"command": "x", "state": "available"})["_id"]
    assert_refused(
        api, db, "post", "/tasks", {"command": "x", "continuations": [child]}, child, "available", "inactive"
    )


def test_frozen_fields_cannot_change_after_inactive(app, api, db):
    # (issue 17: priority, resources, time limit, retries and `held` may
    # change while the task is queued, i.e. still `available`)
    tid = post(api, {"command": "x", "priority": 1})["_id"]
    patch(api, tid, {"priority": 2, "name": "renamed"})
    patch(api, tid, {"state": "available"})
    for field, value in [("command", "y"), ("name", "again")]:
        assert_refused(api, db, "patch", "/tasks/%s" % tid, {field: value}, field, "inactive")
    patch(api, tid, {"priority": 5, "requested_resources": {"cores": 2}, "max_retries": 3, "time_limit": 60})
    assert services(app).queue.claim_next(ObjectId(), {"cores": 8, "memory": GiB, "gpus": 0})["_id"] == ObjectId(tid)
    for field, value in [("priority", 6), ("requested_resources", {"cores": 4}), ("max_retries", 1), ("held", True)]:
        assert_refused(api, db, "patch", "/tasks/%s" % tid, {field: value}, field, "queued", "running")


def test_bad_values_are_refused(api, db):
    for body, word in [
        ({"requested_resources": {"memory": "lots"}}, "memory"),
        ({"requested_resources": {"cores": -1}}, "cores"),
        ({"requested_resources": {"gpus": 1.5}}, "gpus"),
        ({"max_retries": -1}, "max_retries"),
        ({"environment": {"A": 1}}, "environment"),
        ({"command": 5}, "command"),
    ]:
        assert_refused(api, db, "post", "/tasks", dict(body), word)


def test_continuations_cannot_be_patched_directly(api, db):
    child = post(api, {"command": "x"})["_id"]
    tid = post(api, {"command": "x"})["_id"]
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"continuations": [child]}, "continuations")


def test_malformed_json_is_refused(api, db):
    before = db.tasks.count_documents({})
    r = api.post("/tasks", data="{not json", content_type="application/json")
    assert r.status_code == 400
    assert db.tasks.count_documents({}) == before


BAD_FILTERS_AND_SORTS = [
    ("where", '{"name": {"$in": 1}}'),
    ("where", '{"name": {"$type": "colour"}}'),
    ("where", '{"$or": []}'),
    ("where", '{"$and": 1}'),
    ("where", '{"name": {"$not": 1}}'),
    ("where", '{"$or": [{"name": "a"}, {"name": {"$mod": [0, 0]}}]}'),
    ("where", '{"$or": [{"name": "a"}, {"name": {"$mod": "x"}}]}'),
    ("sort", '{"name": "x"}'),
    ("sort", '[["$name", 1]]'),
    ("sort", '[["name"]]'),
    ("sort", "[1]"),
]
BAD_PROJECTIONS = [
    ("projection", '{"name": 2}'),
    ("projection", '{"name": "x"}'),
    ("projection", '{"name": [1]}'),
    ("projection", '{"name": {"$slice": 1}}'),
    ("projection", '{"name": 1, "command": 0}'),
    ("projection", '{"$name": 1}'),
    ("projection", '{"history.worker": 1, "current_history": 1}'),
]
GOOD = {"where": '{"name": "a"}', "sort": '[["name", -1]]', "projection": '{"name": 1}'}


@pytest.mark.parametrize(
    "path,param,value",
    [("/tasks",) + case for case in BAD_FILTERS_AND_SORTS + BAD_PROJECTIONS]
    + [("/tasks/current_history",) + case for case in BAD_FILTERS_AND_SORTS],
)
def test_bad_query_parameters_are_a_400_that_names_them(api, path, param, value):
    post(api, [{"name": "a", "command": "x"}, {"name": "b", "command": "y"}])
    r = api.get(path, query_string={param: value})
    assert r.status_code == 400 and param in r.json["_error"]["message"], (r.status_code, r.json)
    assert api.get(path, query_string={param: GOOD[param]}).status_code == 200


def test_a_task_too_large_to_store_is_a_422_and_links_nothing(app, api, db, monkeypatch):
    """MongoDB keeps documents of up to 16 MiB: a larger task is refused by
    the validator; one the store still refuses (DocumentTooLarge) leaves its
    continuations as they were."""
    child = post(api, {"command": "child"})["_id"]
    r = api.post("/tasks", json={"command": ["x" * (1 << 20)] * 16, "continuations": [child]})
    assert r.status_code == 422 and "15 MiB" in r.json["_issues"]["command"], r.json
    small = post(api, {"command": "x"})["_id"]
    r = api.patch("/tasks/%s" % small, json={"environment": {"V%d" % i: "y" * (1 << 20) for i in range(16)}})
    assert r.status_code == 422 and "environment" in r.json["_issues"], r.json
    assert "environment" not in get(api, small)

    import pymongo.errors

    def too_large(self, *args, **kwargs):
        raise pymongo.errors.DocumentTooLarge("BSON document too large")

    monkeypatch.setattr(type(db.tasks), "insert_many", too_large)  # whichever store serves
    r = api.post("/tasks", json={"command": "x", "continuations": [child]})
    assert r.status_code == 422 and "too large" in r.json["_error"]["message"], r.json
    doc = db.tasks.find_one({"_id": ObjectId(child)})
    assert doc["pending_dependency_count"] == 0 and doc["pending_parents"] == []
