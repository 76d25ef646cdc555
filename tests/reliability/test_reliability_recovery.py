"""The two ways the server-kill runs lost tasks, pinned down one by one:

- a claim written just before the server died, whose answer never reached
  the worker: the task stayed `running` under a live worker that did not
  know it held it;
- a cascade cut short between a continuation's unlink and its release: on
  restart the resumed cascade found the child unlinked already and left it
  `inactive` forever.
"""

import time

import conftest
from bson import ObjectId

HEARTBEAT_TIMEOUT = 0.3


def make_app(store):
    app = conftest.make_app(store, HEARTBEAT_TIMEOUT=HEARTBEAT_TIMEOUT)
    client, dbname = store
    return app, app.test_client(), client[dbname]


def test_a_claim_whose_answer_was_lost_is_abandoned_and_retried(store):
    app, api, db = make_app(store)
    wid = api.post("/workers", json={"host": "n1", "resources": {"cores": 4}}).json["_id"]
    ids = [
        api.post(
            "/tasks", json={"name": n, "command": "true", "state": "available", "max_retries": 1, "priority": p}
        ).json["_id"]
        for n, p in (("got", 2), ("lost", 1))
    ]
    claimed = api.post("/workers/%s/claim" % wid, json={"free": {"cores": 2}, "max_tasks": 2}).json["_items"]
    assert [t["_id"] for t in claimed] == ids
    got, lost = ids
    # The worker received only the first task; its heartbeats report just that one.
    beat = {"tasks": {got: {"attempt": 1, "usage": {"max_rss": 1}}}}
    assert api.post("/workers/%s/heartbeat" % wid, json=beat).status_code == 200
    assert api.get("/tasks/" + lost).json["state"] == "running"  # not before the grace
    time.sleep(2 * HEARTBEAT_TIMEOUT + 0.2)
    # `got` finished and its report is still on its way: heartbeats no longer list it
    assert api.post("/workers/%s/heartbeat" % wid, json={"tasks": {}}).status_code == 200
    task = api.get("/tasks/" + lost).json
    # a lost claim counts against max_lost, not the task's own retries
    assert task["state"] == "available" and task["lost_count"] == 1 and task["retry_count"] == 0, task
    assert task["history"][0]["exit_status"] == "abandoned (worker unreachable)"
    # the one the worker did receive (and reported) is left alone
    assert api.get("/tasks/" + got).json["state"] == "running"
    r = api.post("/tasks/%s/finish" % got, json={"attempt": 1, "outcome": "success", "exit_code": 0})
    assert r.status_code == 200 and r.json["state"] == "terminated"
    # and the abandoned one runs again
    again = api.post("/workers/%s/claim" % wid, json={"free": {"cores": 2}, "max_tasks": 2}).json["_items"]
    assert [t["_id"] for t in again] == [lost] and again[0]["history"][-1]["attempt"] == 2


def test_a_cascade_cut_short_before_the_release_is_finished_on_restart(store):
    app, api, db = make_app(store)
    child = api.post("/tasks", json={"name": "child", "command": "true"}).json["_id"]
    parent = api.post(
        "/tasks", json={"name": "parent", "command": "true", "state": "available", "continuations": [child]}
    ).json["_id"]
    wid = api.post("/workers", json={"host": "n1", "resources": {"cores": 1}}).json["_id"]
    assert api.post("/workers/%s/claim" % wid, json={"free": {"cores": 1}}).json["_items"][0]["_id"] == parent
    # The parent's success was written, and the cascade unlinked the child;
    # then the server died before releasing it (as the store has it after kill -9).
    pid, cid = ObjectId(parent), ObjectId(child)
    db.tasks.update_one(
        {"_id": pid},
        {"$set": {"state": "terminated", "exit_status": "success", "worker": None, "cascade_pending": True}},
    )
    db.tasks.update_one({"_id": cid}, {"$pull": {"pending_parents": pid}, "$inc": {"pending_dependency_count": -1}})
    assert db.tasks.find_one({"_id": cid})["state"] == "inactive"
    # restart: a new app on the same store resumes the cascade
    app2, api2, _ = make_app(store)
    task = api2.get("/tasks/" + child).json
    assert task["state"] == "available" and task["pending_dependency_count"] == 0, task
    assert db.tasks.find_one({"_id": pid})["cascade_pending"] is False
