"""Issue 17 through the HTTP API: dependency kinds, retry, jobs, holds,
queued changes, pending reasons and array limits, checked against the
stored documents."""

import threading

import pytest
from bson import ObjectId
from conftest import MONGO_URI, CheckedSession, LiveServer
from test_server import GiB, get, patch, post, run_to_end

from banyan.server.services import services
from banyan.server.states import FAILURE, SUCCESS

EVERYTHING = {"cores": 1e9, "memory": 1 << 60, "gpus": 1 << 30}


def ids(api, docs):
    r = api.post("/tasks", json=docs)
    assert r.status_code == 201, r.json
    return [item["_id"] for item in (r.json["_items"] if "_items" in r.json else [r.json])]


@pytest.mark.parametrize("outcome", [SUCCESS, FAILURE])
def test_each_kind_of_edge_runs_or_cancels_by_the_parent_outcome(app, api, db, outcome):
    parent = post(api, {"command": "x", "name": "parent", "state": "available"})["_id"]
    ok, anyway, on_failure = ids(
        api,
        [
            {"command": "y", "state": "available", "after": [parent]},
            {"command": "y", "state": "available", "after_any": [parent]},
            {"command": "y", "state": "available", "after_failure": [parent]},
        ],
    )
    assert set(get(api, parent)["continuations"]) == {ok, anyway, on_failure}
    for child in (ok, anyway, on_failure):
        doc = get(api, child)
        assert doc["pending_parents"] == [parent]
        assert doc["pending_reason"]["code"] == "waiting_for_parents"
        assert doc["pending_reason"]["parents"] == [parent]
    run_to_end(app, parent, outcome)
    runs = {ok: outcome == SUCCESS, anyway: True, on_failure: outcome == FAILURE}
    for child, should_run in runs.items():
        doc = get(api, child)
        if should_run:
            assert (doc["state"], doc["pending_parents"]) == ("available", [])
            assert doc["pending_reason"]["code"] in ("workers_busy", "no_worker_fits")
        else:
            assert doc["state"] == "cancelled" and doc["pending_parents"] == []
            assert doc["cancelled_by"] == {
                "task": parent,
                "name": "parent",
                "exit_status": outcome,
                "needed": "success" if child == ok else "failure",
            }
            assert doc["pending_reason"] is None


@pytest.mark.parametrize("outcome", [SUCCESS, FAILURE])
def test_a_wide_fan_out_settles_each_child_by_its_edge(app, api, outcome):
    """More children than the cascade settles one by one: those waiting for
    the parent alone are released together, the others as before."""
    parent = post(api, {"command": "x", "name": "parent", "state": "available"})["_id"]
    other = post(api, {"command": "x", "name": "other", "state": "available"})["_id"]
    waits = ids(api, [{"command": "y", "after": [parent]} for _ in range(6)])
    available = ids(api, [{"command": "y", "state": "available", "after": [parent]} for _ in range(2)])
    anyway = ids(api, [{"command": "y", "after_any": [parent]} for _ in range(2)])
    on_failure = ids(api, [{"command": "y", "after_failure": [parent]} for _ in range(2)])
    both = ids(api, [{"command": "y", "after": [parent, other]} for _ in range(2)])
    held = ids(api, [{"command": "y", "after": [parent], "held": True}])
    (barrier,) = ids(api, [{"name": "barrier", "after": [parent]}])
    (after_barrier,) = ids(api, [{"command": "z", "after": [barrier]}])
    run_to_end(app, parent, outcome)
    ran = outcome == SUCCESS

    def check():
        for child in waits + available + held:
            doc = get(api, child)
            assert doc["state"] == ("available" if ran else "cancelled"), doc
            assert (doc["pending_parents"], doc["pending_dependency_count"]) == ([], 0)
            assert doc["held"] == (child in held)
        for child in anyway + on_failure:
            doc = get(api, child)
            should_run = child in anyway or not ran
            assert doc["state"] == ("available" if should_run else "cancelled"), doc
            assert (doc["pending_parents"], doc["pending_dependency_count"]) == ([], 0)
        for child in both:
            doc = get(api, child)
            if ran:
                assert (doc["state"], doc["pending_parents"], doc["pending_dependency_count"]) == (
                    "inactive",
                    [other],
                    1,
                )
            else:
                assert doc["state"] == "cancelled" and doc["cancelled_by"]["task"] == parent
        assert get(api, barrier)["state"] == ("terminated" if ran else "cancelled")
        assert get(api, after_barrier)["state"] == ("available" if ran else "cancelled")
        assert get(api, parent)["cascade_pending"] is False

    check()
    # the cascade repeated, as after a crash in it, changes nothing
    services(app).queue.tasks.update_one({"_id": ObjectId(parent)}, {"$set": {"cascade_pending": True}})
    services(app).queue.resume_cascades()
    check()
    if ran:
        # the ready ones are claimed, the held one is not
        queue, worker, claimed = services(app).queue, ObjectId(), []
        while (doc := queue.claim_next(worker, EVERYTHING)) is not None:
            claimed.append(str(doc["_id"]))
        assert sorted(claimed) == sorted(waits + available + anyway + [after_barrier, other])
        queue.finish(ObjectId(other), worker, 1, SUCCESS)
        assert all(get(api, child)["state"] == "available" for child in both)


def test_a_parent_that_already_ended_settles_the_edge_at_creation(app, api):
    parent = post(api, {"command": "x", "state": "available"})["_id"]
    run_to_end(app, parent, FAILURE)
    anyway, ok = ids(
        api,
        [
            {"command": "y", "state": "available", "after_any": [parent]},
            {"command": "y", "state": "available", "after": [parent]},
        ],
    )
    assert get(api, anyway)["state"] == "available" and get(api, anyway)["pending_dependency_count"] == 0
    assert get(api, ok)["state"] == "cancelled" and get(api, ok)["cancelled_by"]["task"] == parent
    run_to_end(app, anyway)


def test_bad_edges_are_refused_and_change_nothing(api, db):
    parent = post(api, {"command": "x"})["_id"]
    before = db.tasks.count_documents({})
    for body, word in [
        ({"command": "y", "after": [parent], "after_any": [parent]}, "one kind"),
        ({"command": "y", "after_failure": [str(ObjectId())]}, "must exist"),
        ({"command": "y", "after": ["nope"]}, "objectid"),
    ]:
        r = api.post("/tasks", json=body)
        assert r.status_code == 422 and word in r.get_data(as_text=True), r.json
    child = post(api, {"command": "y", "after": [parent]})["_id"]
    r = api.patch("/tasks/%s" % child, json={"after_any": [parent]})
    assert r.status_code == 422 and "created" in r.get_data(as_text=True)
    assert db.tasks.count_documents({}) == before + 1
    assert get(api, parent)["continuations"] == [child]


def test_retry_revives_what_was_cancelled_because_of_it(app, api):
    parent = post(api, {"command": "x", "state": "available"})["_id"]
    child = post(api, {"command": "y", "state": "available", "after": [parent]})["_id"]
    grandchild = post(api, {"command": "z", "state": "available", "after": [child]})["_id"]
    run_to_end(app, parent, FAILURE)
    assert get(api, grandchild)["cancelled_by"]["task"] == child

    # a child alone cannot come back while its parent's failure rules it out
    r = api.post("/tasks/retry", json={"ids": [child]})
    assert r.status_code == 422 and r.json["_items"][0]["_error"]["code"] == 409
    assert parent in r.json["_items"][0]["_error"]["message"]
    r = api.post("/tasks/retry", json={"ids": [parent, child]})
    assert r.status_code == 200, r.json
    assert [item["_status"] for item in r.json["_items"]] == ["OK", "OK"]
    for task in (child, grandchild):
        doc = get(api, task)
        assert doc["state"] == "available" and doc["cancelled_by"] is None and doc["exit_status"] is None
    assert get(api, child)["pending_parents"] == [parent]
    run_to_end(app, parent)
    run_to_end(app, child)
    run_to_end(app, grandchild)
    assert len(get(api, parent)["history"]) == 2

    # what cannot be retried
    r = api.post("/tasks/retry", json={"ids": [parent, str(ObjectId())]})
    assert r.status_code == 422
    first, missing = r.json["_items"]
    assert "success" in first["_error"]["message"] and missing["_error"]["code"] == 404
    running = post(api, {"command": "x", "state": "available"})["_id"]
    services(app).queue.claim_next(ObjectId(), EVERYTHING)
    assert api.post("/tasks/retry", json={"ids": [running]}).json["_items"][0]["_error"]["code"] == 409
    for body in ({"ids": ["nope"]}, {"ids": parent}, {"tasks": []}):
        assert api.post("/tasks/retry", json=body).status_code in (400, 422)


def test_a_held_task_is_never_claimed_until_released(app, api):
    held = post(api, {"command": "x", "state": "available", "held": True})["_id"]
    assert get(api, held)["pending_reason"]["code"] == "held"
    assert services(app).queue.claim_next(ObjectId(), EVERYTHING) is None
    wid = services(app).queue.db["workers"].insert_one({"host": "h", "state": "active", "resources": {}}).inserted_id
    r = api.patch("/tasks/%s" % held, json={"state": "running", "worker": str(wid)})
    assert r.status_code == 409 and "held" in r.get_data(as_text=True)
    patch(api, held, {"held": False})
    assert services(app).queue.claim_next(ObjectId(), EVERYTHING)["_id"] == ObjectId(held)


def test_priority_changed_while_available_decides_the_claim_order(app, api):
    first, second = ids(api, [{"command": "a", "state": "available"}, {"command": "b", "state": "available"}])
    patch(api, second, {"priority": 5})
    patch(api, first, {"requested_resources": {"cores": 2, "memory": "1 GiB"}})
    assert get(api, first)["requested_resources"]["memory"] == GiB
    worker = ObjectId()
    assert services(app).queue.claim_next(worker, {"cores": 1, "memory": 0, "gpus": 0})["_id"] == ObjectId(second)
    assert services(app).queue.claim_next(worker, {"cores": 1, "memory": 0, "gpus": 0}) is None  # no longer fits
    assert services(app).queue.claim_next(worker, {"cores": 2, "memory": GiB, "gpus": 0})["_id"] == ObjectId(first)


def test_every_post_is_a_job_with_counts(app, api):
    a, b = ids(api, [{"command": "a", "state": "available", "name": "pair"}, {"command": "b", "state": "available"}])
    job = get(api, a)["job"]
    assert get(api, b)["job"] == job
    run_to_end(app, a)
    run_to_end(app, b, FAILURE)
    r = api.get("/jobs/%s" % job)
    assert r.json["name"] == "pair" and r.json["status"] == "failed"
    assert r.json["counts"] == {"queued": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0, "total": 2}
    created = api.post("/jobs", json={"name": "mine", "array_limit": 2})
    assert created.status_code == 201
    c = post(api, {"command": "c", "job": created.json["_id"]})["_id"]
    assert get(api, c)["job"] == created.json["_id"] and get(api, c)["array_limit"] == 2
    listed = {j["_id"]: j for j in api.get("/jobs").json["_items"]}
    assert listed[created.json["_id"]]["counts"]["queued"] == 1
    assert api.post("/jobs", json={"array_limit": 0}).status_code == 422
    assert api.post("/jobs", json=1.5).status_code == 400
    assert api.post("/tasks", json={"command": "x", "job": str(ObjectId())}).status_code == 422


def test_no_worker_fits_names_the_request_and_the_largest_offer(app, api):
    services(app).queue.db["workers"].insert_one(
        {"host": "h", "state": "active", "resources": {"cores": 4, "memory": GiB, "gpus": 0}}
    )
    task = post(api, {"command": "x", "state": "available", "requested_resources": {"gpus": 2}})["_id"]
    reason = get(api, task)["pending_reason"]
    assert reason["code"] == "no_worker_fits" and reason["asks"]["gpus"] == 2 and reason["largest"]["gpus"] == 0
    assert "gpus 2" in reason["message"] and "gpus 0" in reason["message"]
    fits = post(api, {"command": "x", "state": "available", "requested_resources": {"cores": 4}})["_id"]
    assert get(api, fits)["pending_reason"]["code"] == "workers_busy"


def test_a_pending_reason_follows_workers_registered_and_stopped_at_once(app, api):
    """What the live workers offer is kept for a second in the server, but
    a registration or an unregistration through it shows in the next read."""
    task = post(api, {"command": "x", "state": "available", "requested_resources": {"gpus": 1}})["_id"]
    assert get(api, task)["pending_reason"]["code"] == "no_worker_fits"
    r = api.post("/workers", json={"host": "big", "resources": {"cores": 4, "memory": GiB, "gpus": 2}})
    assert r.status_code == 201, r.json
    assert get(api, task)["pending_reason"]["code"] == "workers_busy"
    assert api.delete("/workers/" + r.json["_id"]).status_code == 204
    reason = get(api, task)["pending_reason"]
    assert reason["code"] == "no_worker_fits" and "no live worker" in reason["message"]


def test_array_limit_holds_for_racing_claimers(app, api):
    services(app).queue.db["workers"].insert_one({"host": "h", "state": "active", "resources": EVERYTHING})
    job = api.post("/jobs", json={"name": "capped", "array_limit": 2}).json["_id"]
    tasks = ids(api, [{"command": "x", "state": "available", "job": job} for _ in range(6)])
    claimed, errors = [], []

    def claimer():
        try:
            doc = services(app).queue.claim_next(ObjectId(), EVERYTHING)
            if doc is not None:
                claimed.append(doc)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=claimer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and 1 <= len({d["_id"] for d in claimed}) <= 2
    # A claimer that met only tasks other claimers were writing may have
    # claimed nothing (on FerretDB they pass over them): claims one at a time
    # now fill the job's slots, and no more.
    for _ in range(6):
        services(app).queue.claim_next(ObjectId(), EVERYTHING)
    running = list(services(app).queue.tasks.find({"job": ObjectId(job), "state": "running"}))
    assert len(running) == 2
    waiting = next(t for t in tasks if ObjectId(t) not in {d["_id"] for d in running})
    assert get(api, waiting)["pending_reason"]["code"] == "array_limit"
    assert {ObjectId(t) for t in api.get("/jobs/%s" % job).json["slots"]} == {d["_id"] for d in running}
    for doc in running:  # (as stored: its claimer)
        services(app).queue.finish(doc["_id"], doc["worker"], doc["history"][-1]["attempt"], SUCCESS)
    assert api.get("/jobs/%s" % job).json["slots"] == []
    assert services(app).queue.claim_next(ObjectId(), EVERYTHING) is not None
    assert services(app).queue.claim_next(ObjectId(), EVERYTHING) is not None
    assert services(app).queue.claim_next(ObjectId(), EVERYTHING) is None


@pytest.mark.slow
@pytest.mark.skipif(not MONGO_URI, reason="several server processes share a database only on MongoDB")
def test_array_limit_holds_across_server_processes(tmp_path):
    """Two server processes over one database, workers claiming through both."""
    data = tmp_path / "shared"
    servers = [LiveServer(data).start(), LiveServer(data).start()]
    try:
        http = CheckedSession()
        job = http.post(servers[0].url + "/jobs", json={"name": "capped", "array_limit": 3}).json()["_id"]
        r = http.post(
            servers[0].url + "/tasks", json=[{"command": "x", "state": "available", "job": job} for _ in range(12)]
        )
        assert r.status_code == 201, r.text
        workers = [
            http.post(s.url + "/workers", json={"host": "w%d" % i, "resources": EVERYTHING}).json()["_id"]
            for i, s in enumerate(servers * 2)
        ]
        got = []

        def claim(server, wid):
            reply = CheckedSession().post(
                "%s/workers/%s/claim" % (server.url, wid),
                json={"free": {"cores": 100, "memory": GiB, "gpus": 0}, "max_tasks": 3},
            )
            got.extend(reply.json()["_items"])

        threads = [threading.Thread(target=claim, args=(s, w)) for s, w in zip(servers * 2, workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 3
        assert len(http.get(servers[1].url + "/jobs/" + job).json()["slots"]) == 3
    finally:
        for s in servers:
            s.stop()


def test_live_output_from_heartbeats_until_the_report_replaces_it(api):
    import base64

    from test_claims import claim, finish, heartbeat, register

    wid = register(api)
    tid = post(api, {"command": "x", "state": "available"})["_id"]
    assert claim(api, wid)["_items"][0]["_id"] == tid

    def live(out, written):
        return {
            tid: {
                "attempt": 1,
                "output": {
                    "stdout_base64": base64.b64encode(out).decode(),
                    "stderr_base64": "",
                    "stdout_written": written,
                    "stderr_written": 0,
                },
            }
        }

    for bad in ({"stdout_base64": "%%"}, {"stdout_written": -1}, {"colour": 1}, "text"):
        r = api.post("/workers/%s/heartbeat" % wid, json={"tasks": {tid: {"attempt": 1, "output": bad}}})
        assert r.status_code == 422, (bad, r.json)
    assert api.get("/tasks/%s/logs" % tid).json["stdout"] == ""
    heartbeat(api, wid, live(b"first\n", 6))
    logs = api.get("/tasks/%s/logs" % tid).json
    assert (logs["stdout"], logs["stdout_written"], logs["live"]) == ("first\n", 6, True)
    heartbeat(api, wid, live(b"rst\nsecond\n", 13))  # the end of 13 bytes written
    assert api.get("/tasks/%s/logs" % tid).json["stdout_written"] == 13
    finish(api, tid, 1, "success", exit_code=0, stdout="first\nsecond\n")
    logs = api.get("/tasks/%s/logs" % tid).json
    assert logs == {"attempt": 1, "stdout": "first\nsecond\n", "stderr": ""}
    # a heartbeat that raced the report does not overwrite it
    heartbeat(api, wid, live(b"late\n", 5))
    assert api.get("/tasks/%s/logs" % tid).json["stdout"] == "first\nsecond\n"


def test_a_retry_while_its_parent_ends_still_runs(app, api, monkeypatch):
    """A retried task waits for its parents that have not ended; one that
    ends between the retry's read of them and its write (through another
    server, say) passes the task over in its cascade, since it is still
    cancelled then: the retry itself must settle that edge."""
    parent = post(api, {"command": "x", "state": "available"})["_id"]
    child = post(api, {"command": "y", "state": "available", "after": [parent]})["_id"]
    patch(api, child, {"state": "cancelled"})
    queue = services(app).queue
    read_parents = queue.parents_to_wait_for

    def and_the_parent_ends(doc):
        pending = read_parents(doc)
        if get(api, parent)["state"] == "available":
            run_to_end(app, parent)
        return pending

    monkeypatch.setattr(queue, "parents_to_wait_for", and_the_parent_ends)
    r = api.post("/tasks/retry", json={"ids": [child]})
    assert r.status_code == 200, r.json
    doc = get(api, child)
    assert (doc["state"], doc["pending_parents"], doc["pending_dependency_count"]) == ("available", [], 0)
    run_to_end(app, child)
