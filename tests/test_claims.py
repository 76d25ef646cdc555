"""Workers, claims, heartbeats, results, cancellation and lost workers."""

import random
import threading
import time
import uuid
from datetime import timedelta

import pytest
from bson import ObjectId
from conftest import get_task as task
from conftest import held, make_app
from conftest import patch_task as patch

from banyan.server.auth import TokenStore
from banyan.server.services import services
from banyan.server.states import ABANDONED, FAILURE, SUCCESS, TIMEOUT, utcnow

GiB = 1024**3
MiB = 1024**2
PLENTY = {"cores": 1e6, "memory": 1 << 50, "gpus": 1000}


def register(api, host="node1", resources=None, headers=None):
    r = api.post(
        "/workers",
        json={"host": host, "resources": resources or {"cores": 8, "memory": 16 * GiB, "gpus": 0}},
        headers=headers,
    )
    assert r.status_code == 201, r.json
    return r.json["_id"]


def submit(api, *bodies, headers=None):
    r = api.post("/tasks", json=list(bodies), headers=headers)
    assert r.status_code == 201, r.json
    items = r.json["_items"] if "_items" in r.json else [r.json]
    return [item["_id"] for item in items]


def claim(api, wid, free=None, max_tasks=1, wait=0, status=200, headers=None):
    r = api.post(
        "/workers/%s/claim" % wid, json={"free": free or PLENTY, "max_tasks": max_tasks, "wait": wait}, headers=headers
    )
    assert r.status_code == status, r.json
    return r.json


def finish(api, tid, attempt, outcome, exit_code=None, status=200, headers=None, **extra):
    r = api.post(
        "/tasks/%s/finish" % tid,
        json=dict({"attempt": attempt, "outcome": outcome, "exit_code": exit_code}, **extra),
        headers=headers,
    )
    assert r.status_code == status, r.json
    return r.json


def heartbeat(api, wid, tasks=None, status=200, headers=None):
    r = api.post("/workers/%s/heartbeat" % wid, json={"tasks": tasks or {}}, headers=headers)
    assert r.status_code == status, r.json
    return r.json


def claim_one(api, wid, tid):
    """Claim exactly the task `tid` (the only ready one) and return its attempt number."""
    items = claim(api, wid, max_tasks=1)["_items"]
    assert [t["_id"] for t in items] == [tid]
    return items[0]["history"][-1]["attempt"]


def run_threads(targets):
    """Run callables in threads; re-raise the first failure."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: B902 - reported below
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- registration -----------------------------------------------------------


def test_register_list_show_and_unregister(api):
    wid = register(api, resources={"cores": 4, "memory": "2 GiB", "gpus": 1})
    listed = api.get("/workers").json["_items"]
    assert [w["_id"] for w in listed] == [wid]
    shown = api.get("/workers/%s" % wid).json
    assert shown["state"] == "active" and shown["host"] == "node1" and shown["running"] == []
    assert shown["resources"] == {"cores": 4, "memory": 2 * GiB, "gpus": 1}
    assert "token_id" not in shown and shown["last_heartbeat"]
    (tid,) = submit(api, {"command": "x", "state": "available"})
    claim_one(api, wid, tid)
    assert api.get("/workers/%s" % wid).json["running"] == [tid]
    assert api.get("/workers?state=active").json["_items"][0]["running"] == [tid]
    r = api.delete("/workers/%s" % wid)
    assert r.status_code == 204
    assert api.get("/workers/%s" % wid).json["state"] == "stopped"
    # the task it still held is given back: an abandoned attempt, counted
    # as lost (not as a failure: max_retries is 0)
    t = task(api, tid)
    assert t["state"] == "available" and t["history"][0]["exit_status"] == ABANDONED
    assert (t["lost_count"], t["retry_count"]) == (1, 0)
    claim(api, wid, status=404)
    heartbeat(api, wid, status=404)
    assert api.get("/workers?state=active").json["_items"] == []


@pytest.mark.parametrize(
    "body,word",
    [
        ({"resources": {"cores": 1}}, "host"),
        ({"host": "n", "resources": {"cores": -1}}, "cores"),
        ({"host": "n", "resources": {"memory": "lots"}}, "memory"),
        ({"host": "n", "resources": {"gpus": 1.5}}, "gpus"),
        ({"host": "n", "resources": {"cpus": 1}}, "cpus"),
        ({"host": "n", "colour": "blue"}, "colour"),
    ],
)
def test_bad_registrations_are_refused(api, db, body, word):
    r = api.post("/workers", json=body)
    assert r.status_code == 422 and word in str(r.json), r.json
    assert db.workers.count_documents({}) == 0


def test_unknown_and_malformed_worker_ids(api):
    assert api.get("/workers/nope").status_code == 404
    assert api.get("/workers/%s" % ObjectId()).status_code == 404
    claim(api, ObjectId(), status=404)
    heartbeat(api, "nope", status=404)
    assert api.post("/workers/%s/claim" % register(api), data="{", content_type="application/json").status_code == 400


# -- claims -----------------------------------------------------------------


def test_per_item_claim_race_has_one_winner(api, db):
    (tid,) = submit(api, {"command": "x", "state": "available"})
    workers = [register(api, host="n%d" % i) for i in range(8)]
    codes = []
    barrier = threading.Barrier(len(workers))

    def claimer(wid):
        def go():
            barrier.wait()
            codes.append((wid, api.patch("/tasks/%s" % tid, json={"state": "running", "worker": wid}).status_code))

        return go

    run_threads([claimer(w) for w in workers])
    winners = [w for w, code in codes if code == 200]
    assert len(winners) == 1 and sorted(code for _, code in codes) == [200] + [409] * 7
    doc = db.tasks.find_one({"_id": ObjectId(tid)})
    assert doc["state"] == "running" and str(doc["worker"]) == winners[0]
    assert len(doc["history"]) == 1 and str(doc["history"][0]["worker"]) == winners[0]


def test_per_item_claim_waits_for_unfinished_parents(api, db):
    (child,) = submit(api, {"command": "child"})
    (parent,) = submit(api, {"command": "parent", "continuations": [child]})
    assert api.patch("/tasks/%s" % child, json={"state": "available"}).status_code == 200
    wid = register(api)
    r = api.patch("/tasks/%s" % child, json={"state": "running", "worker": wid})
    assert r.status_code == 409 and "unfinished parent" in r.json["_error"]["message"], r.json
    doc = db.tasks.find_one({"_id": ObjectId(child)})
    assert doc["state"] == "available" and not doc.get("history") and doc.get("worker") is None
    assert db.tasks.find_one({"_id": ObjectId(parent)})["state"] == "inactive"


def test_per_item_claim_needs_an_active_worker(app, api, db):
    (tid,) = submit(api, {"command": "x", "state": "available"})
    lost, stopped = register(api, host="lost"), register(api, host="stopped")
    services(app).reaper.run_once(utcnow() + timedelta(seconds=app.config["HEARTBEAT_TIMEOUT"] + 60))
    assert api.get("/workers/%s" % lost).json["state"] == "lost"
    for wid in (lost, stopped):
        api.delete("/workers/%s" % wid)
        r = api.patch("/tasks/%s" % tid, json={"state": "running", "worker": wid})
        assert r.status_code == 404 and "register again" in r.json["_error"]["message"], r.json
    doc = db.tasks.find_one({"_id": ObjectId(tid)})
    assert doc["state"] == "available" and not doc.get("history")


def test_per_item_claim_by_a_worker_lost_meanwhile_is_given_back(app, api, db, monkeypatch):
    """The worker is marked lost between the check and the claim's write:
    the reaper's sweep came too early, so the claim gives the task back."""
    (tid,) = submit(api, {"command": "x", "state": "available", "max_retries": 0})
    (child,) = submit(api, {"command": "after"})
    api.post("/tasks/%s/add_continuations" % tid, json=[child])
    wid = register(api)
    check = services(app).queue.require_claiming_worker

    def check_then_lose(worker_id, identity):
        check(worker_id, identity)
        services(app).workers.mark_silent_lost(0, utcnow() + timedelta(seconds=1))
        services(app).reaper.run_once()

    monkeypatch.setattr(services(app).queue, "require_claiming_worker", check_then_lose)
    r = api.patch("/tasks/%s" % tid, json={"state": "running", "worker": wid})
    assert r.status_code == 404, r.json
    doc = db.tasks.find_one({"_id": ObjectId(tid)})
    # it never ran: back in the queue without using a retry, its child still waiting
    assert doc["state"] == "available" and doc["worker"] is None and doc.get("retry_count", 0) == 0
    assert doc["history"][-1]["exit_status"] == ABANDONED and doc["history"][-1]["ended"]
    assert db.tasks.find_one({"_id": ObjectId(child)})["state"] == "inactive"
    other = register(api, host="other")
    assert claim(api, other)["_items"][0]["_id"] == tid


def test_batch_claim_by_a_worker_lost_meanwhile_is_given_back(app, api, db, monkeypatch):
    tids = submit(api, *[{"command": "x%d" % i, "state": "available"} for i in range(3)])
    wid = register(api)
    queue = services(app).queue
    claim_batch = queue.claim_batch

    def lost_then_claim(*args, **kwargs):
        # marked lost, and its tasks swept, after the claim's check and before its writes
        services(app).workers.mark_silent_lost(0, utcnow() + timedelta(seconds=1))
        services(app).reaper.run_once()
        return claim_batch(*args, **kwargs)

    monkeypatch.setattr(queue, "claim_batch", lost_then_claim)
    claim(api, wid, max_tasks=3, status=404)
    for doc in db.tasks.find({"_id": {"$in": [ObjectId(t) for t in tids]}}):
        assert doc["state"] == "available" and doc.get("retry_count", 0) == 0, doc
        assert [a["exit_status"] for a in doc["history"]] == [ABANDONED]


def seed_tasks(app, bodies):
    """Insert ready tasks as `POST /tasks` would store them, without paying
    for Eve's per-document validation (this is about claims)."""
    now = utcnow().replace(microsecond=0)
    docs = []
    for body in bodies:
        doc = {
            "max_retries": 0,
            "max_shutdown_time": 10,
            "time_limit": None,
            "priority": 0,
            "continuations": [],
            "_created": now,
            "_updated": now,
            "_etag": uuid.uuid4().hex,
        }
        doc.update(body)
        doc["requested_resources"] = dict({"cores": 1, "memory": 0, "gpus": 0}, **body.get("requested_resources", {}))
        docs.append(doc)
    services(app).queue.prepare_new(docs)
    services(app).queue.tasks.insert_many(docs)
    services(app).queue.after_insert(docs)
    return [str(d["_id"]) for d in docs]


@pytest.mark.slow
def test_eight_concurrent_claimers_take_every_task_exactly_once(app, api, db):
    n = 2000
    seed_tasks(
        app,
        [
            {
                "command": "echo %d" % i,
                "state": "available",
                "priority": i % 7,
                "requested_resources": {"cores": 1, "memory": MiB},
            }
            for i in range(n)
        ],
    )
    claimed = {}

    def batch_claimer(wid):
        def go():
            got = claimed.setdefault(wid, [])
            while True:
                items = claim(api, wid, free={"cores": 64, "memory": GiB, "gpus": 0}, max_tasks=64)["_items"]
                if not items:
                    return
                got += [t["_id"] for t in items]

        return go

    def item_claimer(wid):
        def go():
            got = claimed.setdefault(wid, [])
            rng = random.Random(wid)
            while True:
                r = api.get(
                    '/tasks?where={"state":"available","pending_dependency_count":0}'
                    '&projection={"_id":1}&max_results=100&sort=[("priority",-1),("_created",1)]'
                )
                assert r.status_code == 200, r.json
                ids = [t["_id"] for t in r.json["_items"]]
                if not ids:
                    return
                rng.shuffle(ids)
                for tid in ids:
                    r = api.patch("/tasks/%s" % tid, json={"state": "running", "worker": wid})
                    assert r.status_code in (200, 409), r.json
                    if r.status_code == 200:
                        got.append(tid)

        return go

    batch = [register(api, host="batch%d" % i) for i in range(4)]
    single = [register(api, host="item%d" % i) for i in range(4)]
    run_threads([batch_claimer(w) for w in batch] + [item_claimer(w) for w in single])

    everything = [tid for got in claimed.values() for tid in got]
    assert len(everything) == n and len(set(everything)) == n
    assert all(claimed[w] for w in batch)  # every batch claimer took part
    assert db.tasks.count_documents({"state": "available"}) == 0
    assert db.tasks.count_documents({"state": "running"}) == n
    owner = {tid: wid for wid, got in claimed.items() for tid in got}
    for doc in db.tasks.find({}, {"worker": 1, "history": 1}):
        assert len(doc["history"]) == 1
        assert str(doc["worker"]) == owner[str(doc["_id"])] == str(doc["history"][0]["worker"])


def greedy(tasks, free):
    """What a batch claim must return: best first, each that fits what is left."""
    left, out = dict(free), []
    for t in sorted(tasks, key=lambda t: -t["priority"]):
        req = t["requested_resources"]
        if all(req[k] <= left[k] for k in left):
            out.append(t["_id"])
            for k in left:
                left[k] -= req[k]
    return out


def test_batch_claim_fits_free_resources_in_priority_order(api):
    rng = random.Random(5)
    bodies = [
        {
            "command": "x",
            "state": "available",
            "priority": p,
            "requested_resources": {
                "cores": rng.choice([0, 0.5, 1, 2, 3]),
                "memory": rng.choice([0, 128 * MiB, 256 * MiB, 512 * MiB, GiB, 2 * GiB]),
                "gpus": rng.choice([0, 0, 0, 1]),
            },
        }
        for p in rng.sample(range(1000), 80)
    ]
    ids = submit(api, *bodies)
    tasks = [dict(b, _id=i) for b, i in zip(bodies, ids)]
    free = {"cores": 2, "memory": GiB, "gpus": 0}
    wid = register(api)
    for _ in range(5):
        expected = greedy(tasks, free)
        items = claim(api, wid, free=free, max_tasks=100)["_items"]
        assert [t["_id"] for t in items] == expected
        for key in free:
            assert sum(t["requested_resources"][key] for t in items) <= free[key]
        priorities = [t["priority"] for t in items]
        assert priorities == sorted(priorities, reverse=True)
        assert all(t["state"] == "running" and t["history"][-1]["attempt"] == 1 for t in items)
        got = {t["_id"] for t in items}
        tasks = [t for t in tasks if t["_id"] not in got]
    assert any(t["requested_resources"]["cores"] > 2 for t in tasks)  # never handed out


def test_batch_claim_takes_oldest_first_among_equal_priorities(api, db):
    ids = submit(api, *[{"command": "x", "state": "available", "priority": 3} for _ in range(5)])
    base = utcnow()
    # Eve stamps `_created` to the second: spread them out by hand, newest first
    for age, tid in enumerate(ids):
        db.tasks.update_one({"_id": ObjectId(tid)}, {"$set": {"_created": base - timedelta(seconds=age)}})
    wid = register(api)
    items = claim(api, wid, max_tasks=5)["_items"]
    assert [t["_id"] for t in items] == list(reversed(ids))


def test_batch_claim_honours_max_tasks_and_skips_waiting_tasks(api):
    (child,) = submit(api, {"command": "x"})
    submit(
        api,
        {"command": "x", "state": "available", "continuations": [child]},
        *[{"command": "x", "state": "available"} for _ in range(3)],
    )
    patch(api, child, {"state": "available"})  # available, but waits for its parent
    wid = register(api)
    assert len(claim(api, wid, max_tasks=2)["_items"]) == 2
    assert child not in [t["_id"] for t in claim(api, wid, max_tasks=10)["_items"]]


@pytest.mark.parametrize(
    "body,word",
    [
        ({"free": {"cores": -1}}, "cores"),
        ({"free": "all"}, "free"),
        ({"free": {"cores": 1}, "max_tasks": 0}, "max_tasks"),
        ({"free": {"cores": 1}, "max_tasks": "2"}, "max_tasks"),
        ({"free": {"cores": 1}, "wait": -3}, "wait"),
        ({"free": {"cores": 1}, "colour": 1}, "colour"),
    ],
)
def test_bad_claims_are_refused_and_claim_nothing(api, db, body, word):
    submit(api, {"command": "x", "state": "available"})
    wid = register(api)
    r = api.post("/workers/%s/claim" % wid, json=body)
    assert r.status_code == 422 and word in str(r.json), r.json
    assert db.tasks.count_documents({"state": "running"}) == 0


def test_long_poll_returns_the_task_made_available(store):
    # a re-check interval longer than the wait: only the wake-up can deliver it in time
    app = make_app(store, CLAIM_RECHECK_INTERVAL=60)
    api = app.test_client()
    wid = register(api)
    (tid,) = submit(api, {"command": "x", "requested_resources": {"cores": 2}})
    poller, result = held(
        lambda: claim(api, wid, free={"cores": 4, "memory": GiB, "gpus": 0}, max_tasks=4, wait=20),
        lambda: len(services(app).claim_waiters),
    )
    patch(api, tid, {"state": "available"})
    poller.join()
    assert [t["_id"] for t in result["reply"]["_items"]] == [tid]
    assert result["took"] < 20  # woken by the task, not by the end of the wait
    assert len(services(app).claim_waiters) == 0


def test_long_poll_ignores_tasks_that_do_not_fit(store):
    app = make_app(store)
    api = app.test_client()
    wid = register(api)
    result = {}
    poller = threading.Thread(
        target=lambda: result.update(reply=claim(api, wid, free={"cores": 1, "memory": GiB, "gpus": 0}, wait=1))
    )
    poller.start()
    (big,) = submit(api, {"command": "x", "state": "available", "requested_resources": {"cores": 4}})
    poller.join()
    assert result["reply"] == {"_items": [], "cancel": []}
    assert task(api, big)["state"] == "available"


def test_long_poll_finds_tasks_made_ready_by_another_server(store):
    """In Mongo mode another process may make a task ready without waking us:
    the periodic re-check finds it."""
    app = make_app(store, CLAIM_RECHECK_INTERVAL=0.1)
    api = app.test_client()
    wid = register(api)
    result = {}
    poller = threading.Thread(target=lambda: result.update(reply=claim(api, wid, wait=20)))
    poller.start()
    deadline = time.monotonic() + 10
    while len(services(app).claim_waiters) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    docs = [
        {
            "command": "x",
            "state": "available",
            "priority": 0,
            "requested_resources": {"cores": 1, "memory": 0, "gpus": 0},
            "_created": utcnow(),
            "_updated": utcnow(),
            "_etag": uuid.uuid4().hex,
        }
    ]
    services(app).queue.prepare_new(docs)
    services(app).queue.tasks.insert_one(docs[0])  # no on_ready: "another process" did it
    poller.join()
    assert [t["_id"] for t in result["reply"]["_items"]] == [str(docs[0]["_id"])]


@pytest.mark.slow
def test_too_many_waiting_claims_answer_at_once(store):
    app = make_app(store, CLAIM_MAX_WAITERS=1)
    api = app.test_client()
    wid = register(api)
    poller = threading.Thread(target=lambda: claim(api, wid, wait=2))
    poller.start()
    deadline = time.monotonic() + 10
    while len(services(app).claim_waiters) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    turned_away = claim(api, wid, wait=30)
    assert (turned_away["_items"], turned_away["cancel"]) == ([], [])
    # one active worker: come back after about a second (jittered)
    assert 0.5 <= turned_away["retry_after"] <= 1.5
    assert len(services(app).claim_waiters) == 1  # the second claim never waited
    poller.join()


def test_a_claim_that_queued_too_long_claims_nothing_and_takes_its_reports(app, api):
    """`banyan server` tells a claim how long it waited for a thread
    (banyan.server.dispatch); past CLAIM_MAX_QUEUED its worker may have
    given it up, so it gets a retry_after, not a task (its reports count)."""
    wid = register(api)
    done, waiting = submit(api, {"command": "a", "state": "available"}, {"command": "b", "state": "available"})
    assert [t["_id"] for t in claim(api, wid)["_items"]] == [done]
    late = {"HTTP_X_BANYAN_QUEUED": str(app.config["CLAIM_MAX_QUEUED"] + 1)}
    r = api.post(
        "/workers/%s/claim" % wid,
        environ_overrides=late,
        json={
            "free": PLENTY,
            "max_tasks": 1,
            "wait": 5,
            "finished": [{"task": done, "attempt": 1, "outcome": "success", "exit_code": 0}],
        },
    )
    assert r.status_code == 200, r.json
    assert r.json["_items"] == [] and r.json["retry_after"] > 0
    assert [f["_status"] for f in r.json["finished"]] == ["OK"]
    assert api.get("/tasks/" + done).json["state"] == "terminated"
    assert api.get("/tasks/" + waiting).json["state"] == "available"  # not claimed for a worker gone
    # a claim that did not queue that long gets it
    on_time = {"HTTP_X_BANYAN_QUEUED": str(app.config["CLAIM_MAX_QUEUED"] - 1)}
    r = api.post("/workers/%s/claim" % wid, environ_overrides=on_time, json={"free": PLENTY, "max_tasks": 1})
    assert [t["_id"] for t in r.json["_items"]] == [waiting]


# -- completion and retries -------------------------------------------------


def test_three_failures_with_two_retries_fail_the_task_and_cancel_continuations(api):
    child, grandchild = submit(api, {"command": "c"}, {"command": "g"})
    db_child = submit(api, {"command": "c2", "continuations": [grandchild]})[0]
    (parent,) = submit(
        api, {"command": "p", "state": "available", "max_retries": 2, "continuations": [child, db_child]}
    )
    wid = register(api)
    for attempt in (1, 2, 3):
        assert claim_one(api, wid, parent) == attempt
        done = finish(api, parent, attempt, FAILURE, exit_code=3)
        if attempt < 3:
            assert done["state"] == "available" and done["retry_count"] == attempt
    t = task(api, parent)
    assert t["state"] == "terminated" and t["exit_status"] == FAILURE and t["retry_count"] == 2
    assert [(h["attempt"], h["exit_status"], h["exit_code"]) for h in t["history"]] == [
        (1, FAILURE, 3),
        (2, FAILURE, 3),
        (3, FAILURE, 3),
    ]
    assert all(h["ended"] for h in t["history"])
    assert [task(api, c)["state"] for c in (child, db_child, grandchild)] == ["cancelled"] * 3


def test_success_releases_continuations(api):
    (child,) = submit(api, {"command": "c"})
    (parent,) = submit(api, {"command": "p", "state": "available", "continuations": [child]})
    wid = register(api)
    attempt = claim_one(api, wid, parent)
    done = finish(api, parent, attempt, SUCCESS, exit_code=0, usage={"max_rss": 1000, "cpu_percent": 12.5})
    assert done["state"] == "terminated" and done["exit_status"] == SUCCESS
    assert done["history"][-1]["usage"] == {"max_rss": 1000, "cpu_percent": 12.5}
    assert task(api, child)["state"] == "available"


def test_finish_refusals_change_nothing(api, db):
    (tid,) = submit(api, {"command": "x", "state": "available"})
    wid = register(api)

    def unchanged(body, status, word):
        before = db.tasks.find_one({"_id": ObjectId(tid)})
        r = api.post("/tasks/%s/finish" % tid, json=body)
        assert r.status_code == status and word in str(r.json), r.json
        assert db.tasks.find_one({"_id": ObjectId(tid)}) == before

    unchanged({"attempt": 1, "outcome": SUCCESS}, 409, "no worker holds it")
    attempt = claim_one(api, wid, tid)
    unchanged({"attempt": attempt + 1, "outcome": SUCCESS}, 409, "attempt")
    unchanged({"attempt": attempt, "outcome": ABANDONED}, 422, "outcome")
    unchanged({"attempt": attempt, "outcome": "fine"}, 422, "outcome")
    unchanged({"attempt": "one", "outcome": SUCCESS}, 422, "attempt")
    unchanged({"attempt": attempt, "outcome": SUCCESS, "stdout": 5}, 422, "stdout")
    unchanged({"attempt": attempt, "outcome": SUCCESS, "colour": 1}, 422, "colour")
    for name in ("a\u0000", "a.b", "$rss", ""):
        unchanged({"attempt": attempt, "outcome": SUCCESS, "usage": {name: 1}}, 422, "usage")
    assert api.post("/tasks/%s/finish" % ObjectId(), json={"attempt": 1, "outcome": SUCCESS}).status_code == 404
    finish(api, tid, attempt, SUCCESS, exit_code=0)
    unchanged({"attempt": attempt, "outcome": SUCCESS}, 409, "terminated")  # a repeated report


def test_a_claim_delivers_reports_first_and_claims_what_they_free(api, db):
    first, second, later = submit(api, *[{"command": "x", "state": "available"} for _ in range(3)])
    (child,) = submit(api, {"command": "c"})
    db.tasks.update_one({"_id": ObjectId(second)}, {"$set": {"continuations": [ObjectId(child)]}})
    db.tasks.update_one(
        {"_id": ObjectId(child)}, {"$set": {"pending_parents": [ObjectId(second)], "pending_dependency_count": 1}}
    )
    wid = register(api)
    one = {"cores": 1, "memory": GiB, "gpus": 0}
    items = claim(api, wid, free={"cores": 2, "memory": GiB, "gpus": 0}, max_tasks=2)["_items"]
    assert [t["_id"] for t in items] == [first, second]
    reply = api.post(
        "/workers/%s/claim" % wid,
        json={
            "free": one,
            "max_tasks": 1,
            "finished": [
                {"task": first, "attempt": 1, "outcome": FAILURE, "exit_code": 3, "stdout": "out", "stderr": "err"},
                {"task": second, "attempt": 2, "outcome": SUCCESS, "exit_code": 0},  # not its attempt
                {"task": second, "attempt": 1, "outcome": SUCCESS, "exit_code": 0, "usage": {"max_rss": 5}},
            ],
        },
    )
    assert reply.status_code == 200, reply.json
    assert [r["_status"] for r in reply.json["finished"]] == ["OK", "ERR", "OK"]
    assert reply.json["finished"][1]["_error"]["code"] == 409
    assert [t["_id"] for t in reply.json["_items"]] == [later]  # then the claim: oldest first
    assert task(api, first)["state"] == "terminated" and task(api, first)["exit_status"] == FAILURE
    assert api.get("/tasks/%s/logs" % first).json["stdout"] == "out"
    done = task(api, second)
    assert done["exit_status"] == SUCCESS and done["history"][-1]["usage"] == {"max_rss": 5}
    assert task(api, child)["state"] == "available"  # released by the report in the claim
    # reporting alone: max_tasks 0
    reply = claim(api, wid, free=one, max_tasks=0, status=422)
    assert "max_tasks" in reply["_error"]["message"]
    r = api.post(
        "/workers/%s/claim" % wid,
        json={"free": one, "max_tasks": 0, "finished": [{"task": later, "attempt": 1, "outcome": SUCCESS}]},
    )
    assert r.status_code == 200 and r.json == {
        "_items": [],
        "cancel": [],
        "finished": [{"_id": later, "_status": "OK"}],
    }
    assert task(api, child)["state"] == "available"  # not claimed by a report-only request


def test_a_claim_prefetches_beyond_free_within_the_workers_resources(api, db):
    big, small, *rest = submit(
        api,
        {"command": "x", "state": "available", "requested_resources": {"cores": 9}},
        *[{"command": "x", "state": "available"} for _ in range(5)],
    )
    wid = register(api, resources={"cores": 2, "memory": GiB, "gpus": 0})
    nothing_free = {"cores": 0, "memory": GiB, "gpus": 0}
    r = api.post("/workers/%s/claim" % wid, json={"free": nothing_free, "max_tasks": 1, "prefetch": 4})
    assert r.status_code == 200, r.json
    # each fits the worker's 2 cores (they run in turn): four of one core, as asked
    assert [t["_id"] for t in r.json["_items"]] == [small] + rest[:3]
    assert all(task(api, tid)["state"] == "running" for tid in [small] + rest[:3])
    assert task(api, rest[3])["state"] == "available"
    assert task(api, big)["state"] == "available"  # more cores than the worker has
    r = api.post("/workers/%s/claim" % wid, json={"free": nothing_free, "max_tasks": 1, "prefetch": "2"})
    assert r.status_code == 422 and "prefetch" in r.json["_error"]["message"]


def test_prefetched_tasks_handed_back_go_to_another_worker_as_the_same_attempt(api, db):
    first, second = submit(api, *[{"command": "x", "state": "available"} for _ in range(2)])
    busy, idle = register(api, "busy"), register(api, "idle")
    items = claim(api, busy, max_tasks=2)["_items"]
    assert [t["history"][-1]["attempt"] for t in items] == [1, 1]
    r = api.post(
        "/workers/%s/release" % busy,
        json={"prefetched": True, "tasks": [{"_id": first, "attempt": 1}, {"_id": second, "attempt": 2}]},
    )  # not its attempt: left alone
    assert r.status_code == 200 and r.json == {"released": [first]}
    handed = task(api, first)
    assert handed["state"] == "available" and handed["history"] == [] and handed.get("worker") is None
    assert db.tokens.count_documents({"task": ObjectId(first)}) == 0  # the attempt's token is worth nothing
    again = claim(api, idle)["_items"]
    assert [(t["_id"], t["history"][-1]["attempt"], t["history"][-1]["worker"]) for t in again] == [(first, 1, idle)]
    # the busy worker learns it from its next exchange: that attempt is not its own any more
    assert heartbeat(api, busy, {first: {"attempt": 1}})["unknown"] == [first]
    finish(api, first, 1, SUCCESS, 0)
    assert [h["worker"] for h in task(api, first)["history"]] == [idle]  # one attempt, by the one that ran it
    r = api.post("/workers/%s/release" % busy, json={"prefetched": "yes", "tasks": [{"_id": second, "attempt": 1}]})
    assert r.status_code == 422 and "prefetched" in r.json["_error"]["message"]
    assert task(api, second)["state"] == "running"


@pytest.mark.parametrize(
    "finished, word",
    [
        ("all", "finished"),
        ([{"task": "nope", "attempt": 1, "outcome": SUCCESS}], "not a task id"),
        ([{"attempt": 1, "outcome": SUCCESS}], "task"),
        ([{"task": "0" * 24, "attempt": 1, "outcome": "fine"}], "outcome"),
        ([{"task": "0" * 24, "attempt": 1, "outcome": SUCCESS, "colour": 1}], "colour"),
        ([5], "finished.0"),
    ],
)
def test_claims_with_bad_reports_are_refused_whole(api, db, finished, word):
    (tid,) = submit(api, {"command": "x", "state": "available"})
    wid = register(api)
    before = list(db.tasks.find())
    r = api.post("/workers/%s/claim" % wid, json={"free": PLENTY, "max_tasks": 1, "finished": finished})
    assert r.status_code == 422 and word in r.json["_error"]["message"], r.json
    assert list(db.tasks.find()) == before  # nothing claimed, nothing finished


def test_logs_are_kept_per_attempt_and_capped(store):
    app = make_app(store, LOG_CAP=16)
    api = app.test_client()
    (tid,) = submit(api, {"command": "x", "state": "available", "max_retries": 1})
    wid = register(api)
    assert api.get("/tasks/%s/logs" % tid).json == {"attempt": None, "stdout": "", "stderr": ""}
    finish(api, tid, claim_one(api, wid, tid), FAILURE, 1, stdout="first", stderr="oops")
    finish(api, tid, claim_one(api, wid, tid), SUCCESS, 0, stdout="x" * 100 + "the end", stderr="é" * 20)
    latest = api.get("/tasks/%s/logs" % tid).json
    assert latest["attempt"] == 2
    assert latest["stdout"] == ("x" * 100 + "the end")[-16:]
    assert latest["stderr"] == "é" * 8 and len(latest["stderr"].encode()) <= 16
    assert api.get("/tasks/%s/logs?attempt=1" % tid).json == {"attempt": 1, "stdout": "first", "stderr": "oops"}
    assert api.get("/tasks/%s/logs?attempt=7" % tid).status_code == 404
    assert api.get("/tasks/%s/logs?attempt=x" % tid).status_code == 400
    assert api.get("/tasks/%s/logs" % ObjectId()).status_code == 404


# -- heartbeats and lost workers ----------------------------------------------


def test_heartbeat_records_usage_and_progress(api):
    tid, other = submit(api, {"command": "x", "state": "available"}, {"command": "y"})
    wid = register(api)
    attempt = claim_one(api, wid, tid)
    reply = heartbeat(
        api,
        wid,
        {
            tid: {
                "attempt": attempt,
                "usage": {"max_rss": 5 * MiB, "cpu_percent": 97.5},
                "progress": {"fraction": 0.5, "message": "half"},
            },
            other: {"attempt": 1},
        },
    )
    assert reply == {"cancel": [], "unknown": [other]}
    entry = task(api, tid)["history"][-1]
    assert entry["usage"]["max_rss"] == 5 * MiB and entry["usage"]["cpu_percent"] == 97.5
    assert entry["progress"]["fraction"] == 0.5 and entry["progress"]["message"] == "half"
    assert entry["usage"]["updated"] and entry["progress"]["updated"]
    # a stale attempt is not this worker's any more
    assert heartbeat(api, wid, {tid: {"attempt": attempt + 1}})["unknown"] == [tid]


@pytest.mark.parametrize(
    "entry,word",
    [
        ({"attempt": 0}, "attempt"),
        ({"attempt": 1, "usage": {"max_rss": -1}}, "max_rss"),
        ({"attempt": 1, "progress": {"fraction": 2}}, "fraction"),
        ({"attempt": 1, "progress": {"fraction": 0.1, "message": 5}}, "message"),
        ({"attempt": 1, "colour": 1}, "colour"),
        ({"attempt": 1, "usage": {"rss.max": 1}}, "usage"),
    ],
)
def test_bad_heartbeats_are_refused(api, db, entry, word):
    (tid,) = submit(api, {"command": "x", "state": "available"})
    wid = register(api)
    claim_one(api, wid, tid)
    before = db.tasks.find_one({"_id": ObjectId(tid)})
    r = api.post("/workers/%s/heartbeat" % wid, json={"tasks": {tid: entry}})
    assert r.status_code == 422 and word in str(r.json), r.json
    assert db.tasks.find_one({"_id": ObjectId(tid)}) == before
    r = api.post("/workers/%s/heartbeat" % wid, json={"tasks": {"not-an-id": {"attempt": 1}}})
    assert r.status_code == 422 and "not-an-id" in str(r.json)


def test_silent_worker_is_lost_and_its_task_requeued(store):
    app = make_app(store, HEARTBEAT_TIMEOUT=1)
    api = app.test_client()
    tid, last_try = submit(
        api, {"command": "x", "state": "available", "max_retries": 0}, {"command": "y", "max_retries": 0}
    )
    (child,) = submit(api, {"command": "c"})
    wid = register(api)
    attempt = claim_one(api, wid, tid)
    alive = register(api, host="alive")
    services(app).reaper.start()
    try:
        deadline = time.monotonic() + 20
        while task(api, tid)["state"] != "available" and time.monotonic() < deadline:
            heartbeat(api, alive)
            time.sleep(0.1)
    finally:
        services(app).reaper.stop()
    t = task(api, tid)
    # a lost worker is not the task's failure: max_retries 0, requeued all the same
    assert t["state"] == "available" and t["worker"] is None
    assert (t["retry_count"], t["lost_count"], t["max_lost"]) == (0, 1, 3)
    assert t["history"][0]["exit_status"] == ABANDONED and t["history"][0]["ended"]
    assert api.get("/workers/%s" % wid).json["state"] == "lost"
    assert api.get("/workers/%s" % alive).json["state"] == "active"  # it kept sending heartbeats
    heartbeat(api, wid, {tid: {"attempt": attempt}}, status=404)
    claim(api, wid, status=404)
    # the lost worker's report arrives after all: kept with the attempt, task unchanged
    late = finish(api, tid, attempt, SUCCESS, exit_code=0, stdout="done late\n", usage={"max_rss": 7})
    assert late["state"] == "available" and late["history"][0]["exit_status"] == ABANDONED
    kept = late["history"][0]["late_report"]
    assert (kept["outcome"], kept["exit_code"], kept["usage"]) == (SUCCESS, 0, {"max_rss": 7}) and kept["received"]
    assert api.get("/tasks/%s/logs?attempt=1" % tid).json["stdout"] == "done late\n"
    # sent again (its answer was lost): the first one stays
    again = finish(api, tid, attempt, FAILURE, exit_code=1)
    assert again["history"][0]["late_report"] == kept
    # the requeued attempt runs elsewhere
    assert claim_one(api, alive, tid) == 2
    assert last_try and child


def test_a_task_lost_more_than_max_lost_times_fails(store):
    app = make_app(store, HEARTBEAT_TIMEOUT=1)
    api = app.test_client()
    (child,) = submit(api, {"command": "c"})
    (tid,) = submit(
        api, {"command": "x", "state": "available", "continuations": [child], "max_retries": 5, "max_lost": 1}
    )
    for attempt in (1, 2):
        wid = register(api, host="doomed%d" % attempt)
        assert claim_one(api, wid, tid) == attempt
        now = utcnow()
        assert services(app).reaper.run_once(now)["lost"] == []  # not silent yet
        done = services(app).reaper.run_once(now + timedelta(seconds=3))
        assert done["lost"] == [ObjectId(wid)] and done["abandoned"] == [ObjectId(tid)]
        t = task(api, tid)
        assert (t["lost_count"], t["retry_count"]) == (1, 0)
        if attempt == 1:
            assert t["state"] == "available" and task(api, child)["state"] == "inactive"
    # lost a second time with max_lost 1: failed, whatever retries it had left
    assert t["state"] == "terminated" and t["exit_status"] == ABANDONED
    assert [a["exit_status"] for a in t["history"]] == [ABANDONED, ABANDONED]
    assert task(api, child)["state"] == "cancelled"
    assert services(app).reaper.run_once(utcnow() + timedelta(seconds=6)) == {
        "lost": [],
        "abandoned": [],
        "timed_out": [],
    }


def test_max_lost_is_checked_and_write_once(api):
    for bad in (-1, 1001, "3", 1.5):
        r = api.post("/tasks", json={"command": "x", "max_lost": bad})
        assert r.status_code == 422 and "max_lost" in r.json["_issues"], r.json
    (tid,) = submit(api, {"command": "x", "state": "available"})
    assert (task(api, tid)["max_lost"], task(api, tid)["lost_count"]) == (3, 0)
    r = api.patch("/tasks/%s" % tid, json={"max_lost": 5})
    assert r.status_code == 422 and "max_lost" in r.json["_issues"], r.json
    r = api.patch("/tasks/%s" % tid, json={"lost_count": 2})
    assert r.status_code in (400, 422) and "lost_count" in str(r.json), r.json


def test_heartbeats_keep_a_worker_alive(store):
    app = make_app(store, HEARTBEAT_TIMEOUT=1)
    api = app.test_client()
    wid = register(api)
    time.sleep(1.2)
    heartbeat(api, wid)
    assert services(app).reaper.run_once()["lost"] == []
    assert api.get("/workers/%s" % wid).json["state"] == "active"


def test_time_limit_cancels_with_status_timeout(app, api):
    slow, free = submit(
        api,
        {"command": "x", "state": "available", "time_limit": 1, "priority": 1},
        {"command": "y", "state": "available"},
    )
    wid = register(api)
    items = claim(api, wid, max_tasks=2)["_items"]
    assert [t["_id"] for t in items] == [slow, free]
    assert services(app).reaper.run_once(utcnow())["timed_out"] == []
    assert services(app).reaper.run_once(utcnow() + timedelta(seconds=2))["timed_out"] == [ObjectId(slow)]
    assert task(api, slow)["state"] == "pending_cancellation"
    assert task(api, free)["state"] == "running"
    assert heartbeat(api, wid, {slow: {"attempt": 1}, free: {"attempt": 1}}) == {"cancel": [slow], "unknown": []}
    done = finish(api, slow, 1, "cancelled", exit_code=-15)
    assert done["state"] == "cancelled" and done["exit_status"] == TIMEOUT
    assert done["history"][-1]["exit_status"] == TIMEOUT


def test_time_limit_sweep_spares_a_retry_claimed_meanwhile(app, api, db, monkeypatch):
    """The reaper read attempt 1 as overdue; before it cancels, attempt 1
    failed and attempt 2 was claimed: attempt 2 keeps running."""
    (tid,) = submit(api, {"command": "x", "state": "available", "time_limit": 1, "max_retries": 1})
    wid = register(api)
    claim_one(api, wid, tid)
    queue, cancel = services(app).queue, services(app).queue.cancel

    def retried_first(task_id, **kwargs):
        finish(api, tid, 1, FAILURE, exit_code=1)
        assert claim_one(api, wid, tid) == 2
        return cancel(task_id, **kwargs)

    monkeypatch.setattr(queue, "cancel", retried_first)
    assert services(app).reaper.run_once(utcnow() + timedelta(seconds=2))["timed_out"] == []
    doc = db.tasks.find_one({"_id": ObjectId(tid)})
    assert doc["state"] == "running" and len(doc["history"]) == 2 and "cancel_reason" not in doc


def test_huge_time_limits_are_refused_and_the_reaper_keeps_working(app, api):
    r = api.post("/tasks", json={"command": "x", "time_limit": 1e12})
    assert r.status_code == 422 and "time_limit" in r.json["_issues"], r.json
    long, short = submit(
        api,
        {"command": "x", "state": "available", "time_limit": 10 * 365 * 86400},
        {"command": "y", "state": "available", "time_limit": 1},
    )
    wid = register(api)
    claim(api, wid, max_tasks=2)
    assert services(app).reaper.run_once(utcnow() + timedelta(seconds=2))["timed_out"] == [ObjectId(short)]
    assert task(api, long)["state"] == "running"


# -- cancellation from every state ------------------------------------------


def assert_cancel_refused(api, db, tid):
    """Cancelling again changes nothing: refused (4xx), or for a task that is
    already `cancelled` accepted as the no-op it is."""

    def stored():
        doc = db.tasks.find_one({"_id": ObjectId(tid)})
        return {k: v for k, v in doc.items() if k not in ("_etag", "_updated")}

    before = stored()
    r = api.patch("/tasks/%s" % tid, json={"state": "cancelled"})
    if before["state"] == "cancelled":
        assert r.status_code in (200, 409, 422), r.json
    else:
        assert 400 <= r.status_code < 500, r.json
    assert stored() == before


def test_cancel_inactive_and_available(api, db):
    (child,) = submit(api, {"command": "c"})
    (inactive,) = submit(api, {"command": "x", "continuations": [child]})
    (available,) = submit(api, {"command": "x", "state": "available"})
    for tid in (inactive, available):
        patch(api, tid, {"state": "cancelled"})
        t = task(api, tid)
        assert t["state"] == "cancelled" and t["exit_status"] == "cancelled" and t["history"] == []
        assert_cancel_refused(api, db, tid)
    assert task(api, child)["state"] == "cancelled"
    wid = register(api)
    assert claim(api, wid)["_items"] == []


def test_cancel_running_worker_learns_it_and_reports_cancelled(api, db):
    (child,) = submit(api, {"command": "c"})
    (tid,) = submit(api, {"command": "x", "state": "available", "max_retries": 3, "continuations": [child]})
    wid = register(api)
    attempt = claim_one(api, wid, tid)
    patch(api, tid, {"state": "cancelled"})
    assert task(api, tid)["state"] == "pending_cancellation"
    assert_cancel_refused(api, db, tid)  # already being cancelled
    assert heartbeat(api, wid, {tid: {"attempt": attempt}}) == {"cancel": [tid], "unknown": []}
    assert claim(api, wid)["cancel"] == [tid]
    done = finish(api, tid, attempt, "cancelled", exit_code=-15)
    assert done["state"] == "cancelled" and done["exit_status"] == "cancelled"
    assert done["history"][-1]["exit_status"] == "cancelled" and done["retry_count"] == 0
    assert task(api, child)["state"] == "cancelled"
    assert heartbeat(api, wid, {tid: {"attempt": attempt}}) == {"cancel": [], "unknown": [tid]}
    assert_cancel_refused(api, db, tid)


@pytest.mark.parametrize(
    "outcome,state,child_state", [(SUCCESS, "terminated", "available"), (FAILURE, "terminated", "cancelled")]
)
def test_cancel_running_task_that_finished_first(api, outcome, state, child_state):
    (child,) = submit(api, {"command": "c"})
    (tid,) = submit(api, {"command": "x", "state": "available", "max_retries": 3, "continuations": [child]})
    wid = register(api)
    attempt = claim_one(api, wid, tid)
    patch(api, tid, {"state": "cancelled"})
    done = finish(api, tid, attempt, outcome, exit_code=0 if outcome == SUCCESS else 1)
    assert done["state"] == state and done["exit_status"] == outcome  # no retry once cancelled
    assert task(api, child)["state"] == child_state


def test_cancel_running_task_whose_worker_is_lost(store):
    app = make_app(store, HEARTBEAT_TIMEOUT=1)
    api = app.test_client()
    (tid,) = submit(api, {"command": "x", "state": "available", "max_retries": 3})
    wid = register(api)
    claim_one(api, wid, tid)
    patch(api, tid, {"state": "cancelled"})
    services(app).reaper.run_once(utcnow() + timedelta(seconds=5))
    t = task(api, tid)
    assert t["state"] == "cancelled" and t["exit_status"] == "cancelled"
    assert t["history"][-1]["exit_status"] == ABANDONED


def test_cancel_finished_tasks_is_refused(api, db):
    ok, bad = submit(api, {"command": "x", "state": "available"}, {"command": "y", "state": "available"})
    wid = register(api)
    for tid, outcome in ((ok, SUCCESS), (bad, FAILURE)):
        finish(api, tid, claim(api, wid)["_items"][0]["history"][-1]["attempt"], outcome)
        assert task(api, tid)["state"] == "terminated"
        assert_cancel_refused(api, db, tid)


# -- tokens -------------------------------------------------------------------


def test_worker_tokens_act_only_on_their_own_workers(store):
    app = make_app(store, AUTH=True)
    api = app.test_client()
    tokens = TokenStore(app.data.driver.db)
    a, b, user = (
        {"Authorization": "Bearer %s" % tokens.create(role, name)[1]}
        for role, name in (("worker", "wa"), ("worker", "wb"), ("user", "alice"))
    )
    (tid,) = submit(api, {"command": "x", "state": "available"}, headers=user)
    assert api.post("/workers", json={"host": "n"}).status_code == 401
    assert api.post("/workers", json={"host": "n"}, headers=user).status_code == 403
    wid = register(api, headers=a)
    claim(api, wid, status=403, headers=b)
    claim(api, wid, status=403, headers=user)
    heartbeat(api, wid, status=403, headers=b)
    assert api.delete("/workers/%s" % wid, headers=b).status_code == 403
    attempt = claim(api, wid, headers=a)["_items"][0]["history"][-1]["attempt"]
    finish(api, tid, attempt, SUCCESS, status=403, headers=b)
    finish(api, tid, attempt, SUCCESS, status=403, headers=user)
    assert task_state(api, tid, user) == "running"
    finish(api, tid, attempt, SUCCESS, headers=a)
    assert task_state(api, tid, user) == "terminated"
    assert api.get("/workers", headers=user).status_code == 200


def task_state(api, tid, headers):
    r = api.get("/tasks/%s" % tid, headers=headers)
    assert r.status_code == 200, r.json
    return r.json["state"]


# -- memory: outcome oom and retry_memory_factor -----------------------------


def test_registration_tells_the_worker_the_heartbeat_timeout(store):
    api = make_app(store, HEARTBEAT_TIMEOUT=7).test_client()
    r = api.post("/workers", json={"host": "n1", "resources": {"cores": 1, "memory": GiB, "gpus": 0}})
    assert r.status_code == 201 and r.json["heartbeat_timeout"] == 7


def test_an_oom_attempt_is_retried_with_more_memory_only_with_retry_memory_factor(api):
    wid = register(api)
    plain, grows = submit(
        api,
        {"command": "x", "state": "available", "requested_resources": {"memory": "100 MiB"}},
        {"command": "x", "state": "available", "requested_resources": {"memory": "100 MiB"}, "retry_memory_factor": 2},
    )
    attempt = claim_one(api, wid, plain)
    finish(
        api, plain, attempt, "oom", -9, usage={"max_rss": 90 * MiB, "peak_memory": 100 * MiB, "memory_limit": 100 * MiB}
    )
    doc = task(api, plain)
    assert (doc["state"], doc["exit_status"], doc["retry_count"]) == ("terminated", "oom", 0)
    assert doc["history"][0]["usage"]["peak_memory"] == 100 * MiB
    sizes = []
    for round_ in range(1, 5):  # MAX_MEMORY_RETRIES (3) retries, then the oom is final
        attempt = claim_one(api, wid, grows)
        sizes.append(task(api, grows)["requested_resources"]["memory"])
        finish(api, grows, attempt, "oom", -9)
        doc = task(api, grows)
        assert doc["exit_status"] == "oom" and doc["retry_count"] == 0
        assert doc["state"] == ("available" if round_ <= 3 else "terminated"), round_
    assert sizes == [100 * MiB, 200 * MiB, 400 * MiB, 800 * MiB]
    assert doc["memory_retry_count"] == 3


def test_retry_memory_factor_below_one_is_refused(api):
    r = api.post("/tasks", json={"command": "x", "retry_memory_factor": 0.5})
    assert r.status_code == 422 and "retry_memory_factor" in r.json["_issues"], r.json
