"""Issue 18 through the HTTP API: children added by a running task
(`added_by`), the detour they make, caps, and what a failed attempt's
children become; checked against the stored documents."""

from bson import ObjectId
from test_server import get, post
from test_workflow_api import EVERYTHING, ids

from banyan.server.services import services
from banyan.server.states import FAILURE, SUCCESS


def claim(app, task_id):
    worker = ObjectId()
    claimed = services(app).queue.claim_next(worker, EVERYTHING)
    assert claimed["_id"] == ObjectId(task_id)
    return worker, claimed["history"][-1]["attempt"]


def finish(app, task_id, held, outcome):
    return services(app).queue.finish(ObjectId(task_id), held[0], held[1], outcome)


def test_children_hold_back_the_continuations_and_a_failed_attempt_is_replaced(app, api, db):
    parent = post(api, {"command": "split", "name": "split", "state": "available"})["_id"]
    merge, cleanup, alert = ids(
        api,
        [
            {"command": "merge", "state": "available", "after": [parent]},
            {"command": "cleanup", "state": "available", "after_any": [parent]},
            {"command": "alert", "state": "available", "after_failure": [parent]},
        ],
    )
    job = get(api, parent)["job"]
    held = claim(app, parent)

    shard1, shard2, restart = ids(
        api,
        [
            {"command": "shard 1", "added_by": parent, "state": "available"},
            {"command": "shard 2", "added_by": parent, "state": "available"},
            {"command": "restart", "added_by": parent, "state": "available", "after": [parent]},
        ],
    )
    for shard in (shard1, shard2):
        doc = get(api, shard)
        assert (doc["job"], doc["depth"], doc["added_in_attempt"], doc["superseded"]) == (job, 1, 1, False)
        assert set(doc["continuations"]) == {merge, cleanup}
    assert set(get(api, merge)["pending_parents"]) == {parent, shard1, shard2}
    assert get(api, merge)["pending_dependency_count"] == 3
    assert set(get(api, cleanup)["after_any"]) == {parent, shard1, shard2}  # the same kind of edge
    assert get(api, alert)["pending_parents"] == [parent]  # about the parent's failure alone
    assert get(api, restart)["pending_parents"] == [parent]  # --after-self: runs after it, nothing waits
    assert restart in get(api, parent)["continuations"]
    assert db["jobs"].find_one({"_id": ObjectId(job)})["added_tasks"] == 3

    # the attempt fails: its children are cancelled and superseded, and nothing waits for them
    finish(app, parent, held, FAILURE)
    for child in (shard1, shard2, restart):
        doc = get(api, child)
        assert (doc["state"], doc["superseded"]) == ("cancelled", True), doc
        assert doc["cancelled_by"]["task"] == parent and doc["cancelled_by"]["attempt"] == 1
    assert get(api, merge)["state"] == "cancelled" and get(api, merge)["cancelled_by"]["task"] == parent
    assert get(api, cleanup)["state"] == "available" and get(api, cleanup)["pending_parents"] == []
    assert restart not in get(api, parent)["continuations"]

    # the retry brings the merge back waiting for the parent alone; attempt 2 adds its own children
    r = api.post("/tasks/retry", json={"ids": [parent]})
    assert r.status_code == 200, r.json
    assert get(api, merge)["pending_parents"] == [parent]
    held = claim(app, parent)
    [shard3] = ids(api, [{"command": "shard 3", "added_by": parent, "state": "available", "priority": 9}])
    assert get(api, shard3)["added_in_attempt"] == 2
    assert set(get(api, merge)["pending_parents"]) == {parent, shard3}
    finish(app, parent, held, SUCCESS)
    assert get(api, merge)["pending_parents"] == [shard3]  # the parent ended; its child did not
    finish(app, shard3, claim(app, shard3), SUCCESS)
    merged = get(api, merge)
    assert (merged["state"], merged["pending_dependency_count"]) == ("available", 0)
    current = [t for t in db["tasks"].find({"added_by": ObjectId(parent), "superseded": False})]
    assert [str(t["_id"]) for t in current] == [shard3]


def test_only_a_running_task_adds_children_within_the_caps_of_its_job(app, api, db):
    r = api.post("/jobs", json={"name": "capped", "max_tasks": 2, "max_depth": 1})
    assert r.status_code == 201, r.json
    job = r.json["_id"]
    queued = post(api, {"command": "x", "job": job})["_id"]
    r = api.post("/tasks", json={"command": "y", "added_by": queued})
    assert r.status_code == 409 and "only a running task" in r.json["_error"]["message"]
    r = api.post("/tasks", json={"command": "y", "added_by": str(ObjectId())})
    assert r.status_code == 422  # no such task
    parent = post(api, {"command": "x", "job": job, "state": "available"})["_id"]
    held = claim(app, parent)
    r = api.post("/tasks", json={"command": "y", "added_by": parent, "job": str(ObjectId())})
    assert r.status_code == 422
    before = db["tasks"].count_documents({})
    r = api.post("/tasks", json=[{"command": "y", "added_by": parent}] * 3)
    assert r.status_code == 422 and "(--max-tasks)" in r.json["_error"]["message"], r.json
    assert db["tasks"].count_documents({}) == before
    assert db["jobs"].find_one({"_id": ObjectId(job)})["added_tasks"] == 0
    [child] = ids(api, [{"command": "y", "added_by": parent, "state": "available"}])
    child_held = claim(app, child)
    r = api.post("/tasks", json={"command": "z", "added_by": child})
    assert r.status_code == 422 and "depth 1 (--max-depth)" in r.json["_error"]["message"], r.json
    assert db["jobs"].find_one({"_id": ObjectId(job)})["added_tasks"] == 1
    finish(app, child, child_held, SUCCESS)
    finish(app, parent, held, SUCCESS)
