"""Virtual fields from VIRTUAL_RESOURCES: add/remove continuations in their
three forms, aliases and projections, bulk PATCH, and a new entry that works
with no new code."""

import json
import logging
import random
import threading
import time

import pytest
from bson import ObjectId
from conftest import make_app
from test_server import assert_refused, get, patch, post

from banyan import settings
from banyan.server import states
from banyan.server.services import services


def task(api, **fields):
    return post(api, dict({"command": "x"}, **fields))["_id"]


def stored(db, tid):
    return db.tasks.find_one({"_id": ObjectId(tid)})


def continuations(db, tid):
    return [str(c) for c in stored(db, tid)["continuations"]]


def pending(db, tid):
    doc = stored(db, tid)
    return doc["pending_dependency_count"], sorted(str(p) for p in doc["pending_parents"])


# The three forms of writing a virtual field on one task.


def by_resource(api, name, tid, values, status=200):
    r = api.post("/tasks/%s" % name, json=[{"targets": [tid], "values": values}])
    assert r.status_code == status, r.json
    return r.json


def by_item(api, name, tid, values, status=200):
    r = api.post("/tasks/%s/%s" % (tid, name), json=values)
    assert r.status_code == status, r.json
    return r.json


def by_patch(api, name, tid, values, status=200):
    r = api.patch("/tasks/%s" % tid, json={name: values})
    assert r.status_code == status, r.json
    return r.json


FORMS = [by_resource, by_item, by_patch]


@pytest.fixture
def app_with(store):
    """An app whose VIRTUAL_RESOURCES has extra entries."""

    def make(extra):
        return make_app(store, VIRTUAL_RESOURCES=dict(settings.VIRTUAL_RESOURCES, **extra))

    return make


# -- add and remove, three forms ------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_add_continuations_links_children_without_duplicates(api, db, form):
    parent = task(api)
    a, b = task(api), task(api)
    form(api, "add_continuations", parent, [a, b])
    assert continuations(db, parent) == [a, b]
    assert pending(db, a) == (1, [parent]) and pending(db, b) == (1, [parent])
    form(api, "add_continuations", parent, [a])  # $addToSet: no duplicate, count unchanged
    assert continuations(db, parent) == [a, b]
    assert pending(db, a) == (1, [parent])
    assert get(api, parent)["continuations"] == [a, b]


@pytest.mark.parametrize("form", FORMS)
def test_remove_continuations_unlinks_and_releases_the_last(api, db, form):
    other = task(api)
    a, b = task(api), task(api)
    parent = post(api, {"command": "x", "continuations": [a, b]})["_id"]
    by_patch(api, "add_continuations", other, [a])
    assert pending(db, a) == (2, sorted([parent, other]))
    form(api, "remove_continuations", parent, [a, b])
    assert continuations(db, parent) == []
    assert pending(db, a) == (1, [other])
    assert stored(db, a)["state"] == "inactive"
    # b lost its last parent: it is released by the state machine's rule
    assert pending(db, b) == (0, [])
    assert stored(db, b)["state"] == "available"


@pytest.mark.parametrize("form", FORMS)
def test_appended_entry_with_allows_duplicates_pushes(app_with, form):
    app = app_with({"push_continuations": {"kind": "append", "target": "continuations", "allows_duplicates": True}})
    api, db = app.test_client(), services(app).queue.tasks.database
    parent, child = task(api), task(api)
    form(api, "push_continuations", parent, [child])
    form(api, "push_continuations", parent, [child])
    assert continuations(db, parent) == [child, child]  # $push keeps the duplicate
    assert pending(db, child) == (1, [parent])  # still one parent
    form(api, "remove_continuations", parent, [child])  # $pull removes every copy
    assert continuations(db, parent) == []
    assert pending(db, child) == (0, [])


def test_continuations_added_later_run_after_the_parent(app, api, db):
    from test_server import run_to_end

    parent = task(api)
    child = task(api)
    by_item(api, "add_continuations", parent, [child])
    patch(api, parent, {"state": "available"})
    run_to_end(app, parent)
    assert stored(db, child)["state"] == "available"
    assert pending(db, child) == (0, [])


def test_continuations_added_to_a_finished_parent(app, api, db, monkeypatch):
    """Added to a succeeded parent, a child does not wait; to a cancelled
    one, it is cancelled, but only once the parent's write is done: a write
    that fails leaves the child as it was."""
    done, gone = task(api), task(api)
    patch(api, done, {"state": "available"})
    from test_server import run_to_end

    run_to_end(app, done)
    patch(api, gone, {"state": "cancelled"})
    free, doomed, spared = task(api), task(api), task(api)
    by_item(api, "add_continuations", done, [free])
    assert stored(db, free)["state"] == "inactive" and pending(db, free) == (0, [])
    by_item(api, "add_continuations", gone, [doomed])
    assert stored(db, doomed)["state"] == "cancelled"
    data = app.data

    def lost_race(*args):
        from flask import abort

        abort(409, description="changed meanwhile")

    monkeypatch.setattr(data, "_guarded_change", lost_race)
    by_patch(api, "add_continuations", gone, [spared], status=409)
    assert stored(db, spared)["state"] == "inactive"
    assert spared not in continuations(db, gone)


def test_two_requests_closing_a_cycle_together_do_not_both_pass(app, api, db, monkeypatch):
    """A -> B and B -> A at once: each cycle check alone sees no cycle; the
    second must see the first's edge."""
    a, b = task(api), task(api)
    queue, find_cycle = services(app).queue, services(app).queue.find_cycle

    def slow_find_cycle(*args, **kwargs):
        found = find_cycle(*args, **kwargs)
        time.sleep(0.3)  # widen the window between the check and the write
        return found

    monkeypatch.setattr(queue, "find_cycle", slow_find_cycle)
    codes = {}

    def add(parent, child):
        codes[parent] = api.post("/tasks/%s/add_continuations" % parent, json=[child]).status_code

    threads = [threading.Thread(target=add, args=pair) for pair in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes.values()) == [200, 422], codes
    assert (continuations(db, a), continuations(db, b)) in (([b], []), ([], [a]))
    assert sorted([pending(db, a)[0], pending(db, b)[0]]) == [0, 1]


def test_resource_level_form_reports_per_target(api, db):
    p1, p2, child = task(api), task(api), task(api)
    r = api.post("/tasks/add_continuations", json=[{"targets": [p1, p2], "values": [child]}])
    assert r.status_code == 200, r.json
    assert [item["_id"] for item in r.json["_items"]] == [p1, p2]
    assert all(item["_status"] == "OK" for item in r.json["_items"])
    assert pending(db, child) == (2, sorted([p1, p2]))


# -- refusals: 4xx with a message, nothing changed --------------------------


def test_wrong_payload_shapes_are_refused(api, db):
    parent, child = task(api), task(api)
    for body, word in [
        ({"targets": [parent], "values": [child]}, "list"),
        ([], "list"),
        ([{"targets": [parent]}], "values"),
        ([{"targets": [parent], "values": [child], "extra": 1}], "values"),
        ([{"targets": [], "values": [child]}], "targets"),
        ([{"targets": ["nope"], "values": [child]}], "nope"),
    ]:
        assert_refused(api, db, "post", "/tasks/add_continuations", body, word, status=400)
    assert_refused(api, db, "post", "/tasks/%s/add_continuations" % parent, {"ids": [child]}, "list")
    assert_refused(api, db, "patch", "/tasks/%s" % parent, {"add_continuations": child}, "list")
    assert_refused(
        api, db, "post", "/tasks", {"command": "x", "add_continuations": [child]}, "add_continuations", "existing"
    )
    assert_refused(
        api,
        db,
        "patch",
        "/tasks/%s" % parent,
        {"add_continuations": [child], "remove_continuations": [child]},
        "separate",
    )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["add_continuations", "remove_continuations"])
def test_bad_values_are_refused_in_every_form(api, db, form, name):
    parent = task(api)
    running_child = task(api, state="available")
    missing = str(ObjectId())
    for values, words in [
        (["not-an-id"], ["objectid"]),
        ([missing], [missing, "must exist"]),
        ([running_child], [running_child, "available", "inactive"]),
        (
            [parent] if name == "add_continuations" else [running_child],
            [parent if name == "add_continuations" else "inactive"],
        ),
    ]:
        before = list(db.tasks.find({}))
        body = form(api, name, parent, values, status=422)
        text = json.dumps(body)
        for word in words:
            assert word in text, (word, text)
        assert sorted(db.tasks.find({}), key=lambda d: d["_id"]) == sorted(before, key=lambda d: d["_id"])


@pytest.mark.parametrize("form", FORMS)
def test_cycle_is_refused(api, db, form):
    c = task(api)
    b = post(api, {"command": "x", "continuations": [c]})["_id"]
    a = task(api)
    by_patch(api, "add_continuations", a, [b])  # a -> b -> c
    before = sorted(db.tasks.find({}), key=lambda d: d["_id"])
    body = form(api, "add_continuations", c, [a], status=422)
    assert "cycle" in json.dumps(body)
    assert sorted(db.tasks.find({}), key=lambda d: d["_id"]) == before
    body = form(api, "add_continuations", a, [a], status=422)
    assert "cycle" in json.dumps(body)
    assert sorted(db.tasks.find({}), key=lambda d: d["_id"]) == before


def test_missing_target_task_is_refused(api, db):
    child, missing = task(api), str(ObjectId())
    assert_refused(api, db, "post", "/tasks/%s/add_continuations" % missing, [child], missing, status=404)
    assert_refused(
        api,
        db,
        "post",
        "/tasks/add_continuations",
        [{"targets": [missing], "values": [child]}],
        missing,
        "does not exist",
        status=404,
    )
    assert_refused(api, db, "patch", "/tasks/%s" % missing, {"add_continuations": [child]}, status=404)


def test_plain_patch_of_continuations_is_refused(api, db):
    parent, child = task(api), task(api)
    assert_refused(
        api, db, "patch", "/tasks/%s" % parent, {"continuations": [child]}, "continuations", "add_continuations"
    )
    assert_refused(api, db, "patch", "/tasks", [{"_id": parent, "continuations": [child]}], "continuations")


@pytest.mark.parametrize("form", FORMS)
def test_roles_not_in_writable_by_get_403(app_with, form):
    app = app_with({"worker_continuations": {"kind": "append", "target": "continuations", "writable_by": ["worker"]}})
    api, db = app.test_client(), services(app).queue.tasks.database
    parent, child = task(api), task(api)
    before = sorted(db.tasks.find({}), key=lambda d: d["_id"])
    body = form(api, "worker_continuations", parent, [child], status=403)
    assert "worker" in json.dumps(body) and "admin" in json.dumps(body)
    assert sorted(db.tasks.find({}), key=lambda d: d["_id"]) == before


# -- hooks and logging -------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_eve_hooks_fire_for_virtual_writes(app, api, form):
    seen = []
    app.on_pre_PATCH_tasks += lambda request, lookup: seen.append("pre")
    app.on_update_tasks += lambda updates, original: seen.append(("update", sorted(updates)))
    app.on_updated_tasks += lambda updates, original: seen.append(("updated", sorted(updates)))
    parent, child = task(api), task(api)
    form(api, "add_continuations", parent, [child])
    names = [s if isinstance(s, str) else s[0] for s in seen]
    assert names[-2:] == ["update", "updated"]
    assert "add_continuations" in seen[-1][1]
    assert "pre" in names


def test_virtual_writes_log_their_store_query(api, caplog):
    parent, child = task(api), task(api)
    with caplog.at_level(logging.DEBUG, logger="banyan.server.datalayer"):
        by_patch(api, "add_continuations", parent, [child])
        by_item(api, "remove_continuations", parent, [child])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "$addToSet" in text and "$pull" in text and child in text


# -- aliases and projections ---------------------------------------------


def claimed_task(app, api, attempts=2):
    """A task with `attempts` history entries (failed attempts, retried)."""
    from test_server import run_to_end

    tid = task(api, max_retries=5)
    patch(api, tid, {"state": "available"})
    for _ in range(attempts - 1):
        run_to_end(app, tid, outcome="failure")
    worker = ObjectId()
    services(app).queue.claim_next(worker, {"cores": 64, "memory": 1 << 50, "gpus": 0})
    return tid


def test_current_history_is_the_last_attempt_through_projections(app, api, db):
    tid = claimed_task(app, api)
    history = get(api, tid)["history"]
    assert [h["attempt"] for h in history] == [1, 2]
    full = get(api, tid)
    assert full["current_history"] == history[-1]
    only = api.get('/tasks/%s?projection={"current_history": 1}' % tid).json
    assert only["current_history"] == history[-1]
    assert "history" not in only and "command" not in only
    both = api.get('/tasks/%s?projection={"current_history": 1, "history": 1}' % tid).json
    assert both["current_history"] == history[-1] and both["history"] == history
    without = api.get('/tasks/%s?projection={"current_history": 0}' % tid).json
    assert "current_history" not in without and without["history"] == history
    no_history = api.get('/tasks/%s?projection={"history": 0}' % tid).json
    assert no_history["current_history"] == history[-1] and "history" not in no_history
    listed = api.get('/tasks?projection={"current_history": 1}').json["_items"]
    assert {i["_id"]: i.get("current_history") for i in listed}[tid] == history[-1]
    assert all("history" not in i for i in listed)


def test_current_history_gather_honours_where_and_is_read_only(app, api, db):
    tid = claimed_task(app, api, attempts=1)
    fresh = task(api)
    r = api.get('/tasks/current_history?where={"_id": "%s"}' % tid)
    assert r.status_code == 200, r.json
    [item] = r.json["_items"]
    assert item["_id"] == tid and item["current_history"]["attempt"] == 1
    assert "history" not in item and "command" not in item
    everything = {i["_id"]: i for i in api.get("/tasks/current_history").json["_items"]}
    assert everything[fresh]["current_history"] is None
    assert api.post("/tasks/current_history", json=[{"targets": [tid], "values": {}}]).status_code == 405
    assert api.post("/tasks/%s/current_history" % tid, json={}).status_code in (404, 405)
    assert_refused(api, db, "patch", "/tasks/%s" % tid, {"current_history": {"attempt": 9}}, "read-only")


def test_rank_alias_sets_priority_on_many_tasks(api, db):
    a, b, c = task(api), task(api), task(api)
    r = api.post("/tasks/rank", json=[{"targets": [a, b], "value": 7}, {"targets": [c], "value": -1}])
    assert r.status_code == 200, r.json
    assert [stored(db, t)["priority"] for t in (a, b, c)] == [7, 7, -1]
    by_item(api, "rank", a, 3)
    by_patch(api, "rank", b, 4)
    assert [stored(db, t)["priority"] for t in (a, b)] == [3, 4]
    assert "rank" not in stored(db, a)
    ranks = {i["_id"]: i["rank"] for i in api.get('/tasks/rank?where={"priority": {"$gt": 0}}').json["_items"]}
    assert ranks == {a: 3, b: 4}
    assert api.get('/tasks/%s?projection={"rank": 1}' % a).json["rank"] == 3
    # the target's rules apply: an integer, changeable only while queued (issue 17)
    assert_refused(api, db, "post", "/tasks/rank", [{"targets": [a], "value": "high"}], "integer")
    patch(api, c, {"state": "available"})
    by_patch(api, "rank", c, 9)
    patch(api, c, {"state": "cancelled"})
    assert_refused(api, db, "patch", "/tasks/%s" % c, {"rank": 10}, "queued")
    assert_refused(api, db, "patch", "/tasks/%s" % a, {"rank": 9, "priority": 8}, "not both")


def test_new_entries_get_working_endpoints_with_no_other_code(app_with):
    app = app_with(
        {
            "first_attempt": {"kind": "alias", "target": "history", "element": 0, "readonly": True},
            "label": {"kind": "alias", "target": "name"},
            "drop_continuations": {"kind": "remove", "target": "continuations"},
        }
    )
    api, db = app.test_client(), services(app).queue.tasks.database
    tid = claimed_task(app, api)
    first = get(api, tid)["history"][0]
    assert api.get('/tasks/%s?projection={"first_attempt": 1}' % tid).json["first_attempt"] == first
    assert {i["_id"]: i["first_attempt"] for i in api.get("/tasks/first_attempt").json["_items"]}[tid] == first
    other = task(api)
    r = api.post("/tasks/label", json=[{"targets": [other], "value": "renamed"}])
    assert r.status_code == 200, r.json
    assert stored(db, other)["name"] == "renamed"
    child = task(api)
    parent = post(api, {"command": "x", "continuations": [child]})["_id"]
    by_item(api, "drop_continuations", parent, [child])
    assert continuations(db, parent) == [] and pending(db, child) == (0, [])


def test_bad_entries_fail_when_the_app_is_created(app_with):
    for entry in [
        {"kind": "copy", "target": "name"},
        {"kind": "append", "target": "nope"},
        {"kind": "append", "target": "name"},
        {"kind": "append", "target": "continuations", "readonly": True},
    ]:
        with pytest.raises(ValueError):
            app_with({"broken": entry})


# -- bulk PATCH ---------------------------------------------------------------


def test_bulk_patch_applies_each_item_and_reports_each(api, db):
    a, b, c, child = task(api), task(api), task(api), task(api)
    r = api.patch(
        "/tasks",
        json=[
            {"_id": a, "name": "first", "priority": 2},
            {"_id": b, "add_continuations": [child]},
            {"_id": c, "state": "terminated"},
            {"_id": str(ObjectId()), "name": "ghost"},
        ],
    )
    assert r.status_code == 422, r.json
    items = r.json["_items"]
    assert [i["_status"] for i in items] == ["OK", "OK", "ERR", "ERR"]
    assert "terminated" in json.dumps(items[2]) and "does not exist" in json.dumps(items[3])
    assert stored(db, a)["name"] == "first" and stored(db, a)["priority"] == 2
    assert continuations(db, b) == [child] and pending(db, child) == (1, [b])
    assert stored(db, c)["state"] == "inactive"
    r = api.patch("/tasks", json=[{"_id": a, "name": "again"}, {"_id": c, "state": "available"}])
    assert r.status_code == 200 and r.json["_status"] == "OK", r.json
    assert stored(db, c)["state"] == "available"


def test_bulk_patch_shape_is_checked(api, db):
    tid = task(api)
    assert_refused(api, db, "patch", "/tasks", {"_id": tid, "name": "x"}, "list", status=400)
    assert_refused(api, db, "patch", "/tasks", [{"name": "x"}], "_id", status=400)
    assert_refused(api, db, "patch", "/tasks", [{"_id": "zzz", "name": "x"}], "zzz", status=400)


# -- concurrency ---------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_adds_and_removes_keep_counts_consistent(app, db):
    api = app.test_client()
    children = [task(api) for _ in range(3)]
    anchor = post(api, {"command": "x", "continuations": children})["_id"]  # keeps children inactive
    parents = [task(api) for _ in range(3)]
    outcomes = []
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        client = app.test_client()
        try:
            for _ in range(12):
                name = rng.choice(["add_continuations", "remove_continuations"])
                parent = rng.choice(parents)
                values = rng.sample(children, rng.randint(1, 3))
                form = rng.choice(FORMS)
                for _attempt in range(50):
                    if form is by_resource:
                        r = client.post("/tasks/%s" % name, json=[{"targets": [parent], "values": values}])
                    elif form is by_item:
                        r = client.post("/tasks/%s/%s" % (parent, name), json=values)
                    else:
                        r = client.patch("/tasks/%s" % parent, json={name: values})
                    if r.status_code != 409:
                        break
                outcomes.append(r.status_code)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(outcomes) <= {200, 409}, outcomes
    assert outcomes.count(200) > 0
    for child in children:
        parents_listing = {anchor} | {p for p in parents if child in continuations(db, p)}
        count, waiting_for = pending(db, child)
        assert waiting_for == sorted(parents_listing)
        assert count == len(parents_listing)
        assert stored(db, child)["state"] == "inactive"
    for p in parents:
        assert "continuation_lease" not in stored(db, p)


@pytest.mark.slow
def test_edits_through_two_apps_while_a_worker_runs_the_tasks_keep_the_graph(store):
    """Continuations added and removed through two apps on one store while a
    worker claims and finishes the same tasks (a task whose last parent is
    removed becomes available and runs): once all is quiet, each task that
    has not ended waits for exactly the unfinished parents that list it, and
    each task that ran started after every parent listing it succeeded."""
    apps = [make_app(store), make_app(store)]
    tasks = [post(apps[0].test_client(), {"command": "x", "name": "t%d" % i})["_id"] for i in range(6)]
    quiet, errors, answers = threading.Event(), [], []

    def some_ran():
        return services(apps[0]).queue.tasks.find_one({"history.0": {"$exists": True}}, {"_id": 1}) is not None

    def editor(seed):
        rng, client = random.Random(seed), apps[seed % 2].test_client()
        try:
            # 20 edits, and more until a task they released has run
            for edit in range(200):
                if edit >= 20 and some_ran():
                    break
                parent, child = rng.sample(tasks, 2)
                name = rng.choice(["add_continuations", "remove_continuations"])
                answers.append(client.post("/tasks/%s/%s" % (parent, name), json=[child]).status_code)
        except BaseException as e:  # surfaced below
            errors.append(e)

    def worker():
        queue, wid = services(apps[1]).queue, ObjectId()
        try:
            while not quiet.is_set():
                claimed = queue.claim_next(wid, {"cores": 64, "memory": 1 << 40, "gpus": 0})
                if claimed is None:
                    time.sleep(0.01)
                else:
                    queue.finish(claimed["_id"], wid, claimed["history"][-1]["attempt"], "success")
        except BaseException as e:
            errors.append(e)

    running = threading.Thread(target=worker)
    running.start()
    editors = [threading.Thread(target=editor, args=(seed,)) for seed in range(3)]
    for thread in editors:
        thread.start()
    for thread in editors:
        thread.join()
    quiet.set()
    running.join()
    assert errors == []
    # 422: the child had left 'inactive' (or a cycle); 409: another edit held the parent
    assert set(answers) <= {200, 409, 422} and 200 in answers, answers
    db = services(apps[0]).queue.tasks
    docs = {str(d["_id"]): d for d in db.find({"_id": {"$in": [ObjectId(t) for t in tasks]}})}
    assert any(docs[t]["history"] for t in tasks), "no task was released and run while edited; nothing was tested"
    for child in tasks:
        listing = [p for p in tasks if ObjectId(child) in docs[p]["continuations"]]
        unfinished = [p for p in listing if docs[p]["state"] not in ("terminated", "cancelled")]
        doc = docs[child]
        assert sorted(str(p) for p in doc["pending_parents"]) == sorted(unfinished), (child, doc["state"])
        assert doc["pending_dependency_count"] == len(unfinished), child
        if doc["history"]:
            for parent in listing:
                assert (docs[parent]["state"], docs[parent]["exit_status"]) == ("terminated", "success")
                assert docs[parent]["history"][-1]["ended"] <= doc["history"][0]["started"], (parent, child)


# -- a continuation change racing its parent's end ------------------------------


def _running(app, api, *tids):
    """Make the parentless inactive tasks `tids` available and claim them
    as one worker; {task id: attempt} and the worker's id."""
    for tid in tids:
        patch(api, tid, {"state": "available"})
    worker, attempts = ObjectId(), {}
    for _ in tids:
        claimed = services(app).queue.claim_next(worker, {"cores": 64, "memory": 1 << 40, "gpus": 0})
        attempts[str(claimed["_id"])] = claimed["history"][-1]["attempt"]
    assert sorted(attempts) == sorted(tids)
    return worker, attempts


def test_adding_a_listed_child_again_as_its_parent_ends_leaves_no_wait_for_it(app, api, db, monkeypatch):
    """add_continuations(P, [C]) when P lists C already, and P's worker
    reports success after the request read P and before it linked C: P's
    cascade settles the edge, the request's link makes it again, and the
    request's write of P fails (P ended meanwhile). C must not be left
    waiting for the ended P: it would never run."""
    parent, other, child = task(api), task(api), task(api)
    by_item(api, "add_continuations", parent, [child])
    by_item(api, "add_continuations", other, [child])
    worker, attempts = _running(app, api, parent)
    queue, link = services(app).queue, services(app).queue._link

    def end_parent_first(parent_id, child_id):
        monkeypatch.setattr(queue, "_link", link)
        queue.finish(parent_id, worker, attempts[parent], "success")
        return link(parent_id, child_id)

    monkeypatch.setattr(queue, "_link", end_parent_first)
    by_item(api, "add_continuations", parent, [child], status=409)
    assert stored(db, parent)["state"] == "terminated" and continuations(db, parent) == [child]
    assert stored(db, child)["state"] == "inactive" and pending(db, child) == (1, [other])
    assert "continuation_lease" not in stored(db, parent)


def _link_inside_the_cascade(monkeypatch, app, parent, child, ended):
    """Make the next link of the request link `child` to `parent` right
    after a cascade stops `child` waiting for a parent, while the tasks
    `ended` ({id: (worker, attempt)}) end one after the other in that
    request's link (so that its write of `parent` fails); the link's
    outcome is the request's."""
    queue = services(app).queue
    link, unlink = queue._link, queue._unlink
    made = []

    def link_after_the_unlink(parent_id, child_id, *args, **kwargs):
        monkeypatch.setattr(queue, "_unlink", unlink)
        doc = unlink(parent_id, child_id, *args, **kwargs)
        try:
            made.append(link(ObjectId(parent), ObjectId(child)))
        except states.TransitionError as e:
            made.append(e)
        return doc

    def end_them_around_the_link(parent_id, child_id):
        monkeypatch.setattr(queue, "_link", link)
        monkeypatch.setattr(queue, "_unlink", link_after_the_unlink)
        for tid, (worker, attempt) in ended.items():
            queue.finish(ObjectId(tid), worker, attempt, "success")
        assert made, "no cascade stopped the child waiting"
        if isinstance(made[0], Exception):
            raise made[0]
        return made[0]

    monkeypatch.setattr(queue, "_link", end_them_around_the_link)


def test_adding_a_listed_child_again_inside_its_parents_cascade_cannot_hold_it_back(app, api, db, monkeypatch):
    """As above, C waiting for P alone, and the request's link lands right
    after the cascade stops C waiting for P (before, it then held back C's
    release, and C waited for the ended P for good): C runs."""
    parent, child = task(api), task(api)
    by_item(api, "add_continuations", parent, [child])
    worker, attempts = _running(app, api, parent)
    _link_inside_the_cascade(monkeypatch, app, parent, child, {parent: (worker, attempts[parent])})
    r = api.post("/tasks/%s/add_continuations" % parent, json=[child])
    assert r.status_code == 422 and "available" in r.json["_error"]["message"], r.json
    assert stored(db, parent)["state"] == "terminated"
    assert stored(db, child)["state"] == "available" and pending(db, child) == (0, [])


def test_an_addition_that_fails_releases_a_child_its_other_parent_left(app, api, db, monkeypatch):
    """add_continuations(P, [C]) links C, then C's only other parent Q ends
    (leaving C waiting for P alone, so not released) and P's write fails:
    undoing the link must release C, as Q's end would have."""
    parent, other, child = task(api), task(api), task(api)
    by_item(api, "add_continuations", other, [child])
    worker, attempts = _running(app, api, parent, other)
    queue, link = services(app).queue, services(app).queue._link

    def both_end_after_the_link(parent_id, child_id):
        monkeypatch.setattr(queue, "_link", link)
        made = link(parent_id, child_id)
        queue.finish(ObjectId(other), worker, attempts[other], "success")
        queue.finish(ObjectId(parent), worker, attempts[parent], "success")
        return made

    monkeypatch.setattr(queue, "_link", both_end_after_the_link)
    by_item(api, "add_continuations", parent, [child], status=409)
    assert continuations(db, parent) == []
    assert stored(db, child)["state"] == "available" and pending(db, child) == (0, [])


def test_a_link_between_a_parents_unlink_and_its_release_cannot_hold_the_child_back(app, api, db, monkeypatch):
    """C waits for Q alone; Q ends and its cascade stops C waiting for it
    while add_continuations(P, [C]) links C, whose write of P then fails (P
    ended too). C must run: its only parent succeeded."""
    parent, other, child = task(api), task(api), task(api)
    by_item(api, "add_continuations", other, [child])
    worker, attempts = _running(app, api, parent, other)
    ended = {other: (worker, attempts[other]), parent: (worker, attempts[parent])}
    _link_inside_the_cascade(monkeypatch, app, parent, child, ended)
    r = api.post("/tasks/%s/add_continuations" % parent, json=[child])
    assert r.status_code == 422 and "available" in r.json["_error"]["message"], r.json
    assert continuations(db, parent) == []
    assert stored(db, child)["state"] == "available" and pending(db, child) == (0, [])
