"""`POST /tasks/wait`: a wait on tasks answered as soon as they have all
finished (woken by the finish itself, not by a poll), and `Client.wait` on
top of it."""

import threading
import time

import conftest
import pytest
from conftest import make_app
from conftest import patch_task as patch
from test_claims import PLENTY, claim, finish, register, submit

from banyan.server import serve
from banyan.server.services import services
from banyan.server.states import utcnow
from banyan.waiting import OUTCOME_PROJECTION


def wait(api, body, status=200):
    r = api.post("/tasks/wait", json=body)
    assert r.status_code == status, r.json
    return r.json


def held(app, api, body):
    """Start a wait in a thread; returns (thread, result) once the server holds it."""
    return conftest.held(lambda: wait(api, body), lambda: len(services(app).finish_waiters))


def running(api, count=1):
    """`count` tasks claimed by a new worker: [(task id, attempt)]."""
    wid = register(api)
    ids = submit(api, *[{"command": "x", "state": "available"} for _ in range(count)])
    items = claim(api, wid, free=PLENTY, max_tasks=count)["_items"]
    assert sorted(t["_id"] for t in items) == sorted(ids)
    return [(t["_id"], t["history"][-1]["attempt"]) for t in sorted(items, key=lambda t: ids.index(t["_id"]))]


def test_finished_and_unknown_tasks_answer_at_once_with_what_is_unfinished(api):
    (done, attempt), (busy, _) = running(api, 2)
    finish(api, done, attempt, "success", 0)
    (inactive,) = submit(api, {"command": "x"})
    reply = wait(api, {"ids": [done, busy, inactive, "0" * 24], "timeout": 0})
    assert reply == {"unfinished": {busy: "running", inactive: "inactive"}, "waited": True}
    assert wait(api, {"ids": [done, "0" * 24]}) == {"unfinished": {}, "waited": True}


def test_a_wait_with_outcomes_says_how_each_finished_task_ended_as_a_read_would(api):
    (done, attempt), (busy, _) = running(api, 2)
    finish(api, done, attempt, "failure", 3)
    (never,) = submit(api, {"command": "x", "name": "never"})
    patch(api, never, {"state": "cancelled"})
    reply = wait(api, {"ids": [done, busy, never, "0" * 24], "timeout": 0, "outcomes": True})
    assert reply["unfinished"] == {busy: "running"} and reply["waited"] is True
    assert reply["missing"] == ["0" * 24]
    assert sorted(reply["finished"]) == sorted([done, never])
    for task_id in (done, never):
        read = api.get('/tasks/%s?projection={"%s": 1}' % (task_id, '": 1, "'.join(OUTCOME_PROJECTION))).json
        assert reply["finished"][task_id] == {key: read.get(key) for key in ["_id", *OUTCOME_PROJECTION]}
    assert reply["finished"][done]["current_history"]["exit_code"] == 3
    assert reply["finished"][never]["current_history"] is None
    assert wait(api, {"ids": [busy], "timeout": 0}) == {"unfinished": {busy: "running"}, "waited": True}


def test_a_held_wait_answers_when_the_last_task_ends(store):
    # a re-check longer than the wait: only the finishes can wake it in time
    app = make_app(store, WAIT_RECHECK_INTERVAL=60)
    api = app.test_client()
    (first, attempt), (second, _) = running(api, 2)
    thread, result = held(app, api, {"ids": [first, second], "timeout": 20})
    finish(api, first, attempt, "failure", 1)
    assert thread.is_alive() and len(services(app).finish_waiters) == 1  # one of two: still held
    patch(api, second, {"state": "cancelled"})  # pending_cancellation: not finished yet
    assert thread.is_alive() and len(services(app).finish_waiters) == 1
    finish(api, second, 1, "cancelled", -15)
    thread.join()
    assert result["reply"] == {"unfinished": {}, "waited": True}
    assert result["took"] < 20
    assert len(services(app).finish_waiters) == 0


def test_a_held_wait_is_woken_by_a_cascade_and_by_a_barrier(store):
    app = make_app(store, WAIT_RECHECK_INTERVAL=60)
    api = app.test_client()
    (barrier,) = submit(api, {"name": "barrier"})
    (child,) = submit(api, {"command": "x"})
    (parent,) = submit(api, {"command": "x", "continuations": [child]})
    thread, result = held(app, api, {"ids": [barrier, child], "timeout": 20})
    patch(api, barrier, {"state": "available"})  # no command: succeeds at once
    patch(api, parent, {"state": "cancelled"})  # cancels its continuation
    thread.join()
    assert result["reply"] == {"unfinished": {}, "waited": True}
    assert result["took"] < 20


def test_a_held_wait_ends_at_its_timeout_with_the_states(api):
    ((busy, _),) = running(api)
    started = time.monotonic()
    reply = wait(api, {"ids": [busy], "timeout": 0.3})
    assert time.monotonic() - started >= 0.3
    assert reply == {"unfinished": {busy: "running"}, "waited": True}


def test_a_wait_sees_tasks_finished_by_another_server(store):
    """In Mongo mode another process may finish the tasks without waking
    this one: the periodic re-check sees it."""
    app = make_app(store, WAIT_RECHECK_INTERVAL=0.1)
    api = app.test_client()
    ((busy, _),) = running(api)
    thread, result = held(app, api, {"ids": [busy], "timeout": 20})
    services(app).queue.tasks.update_one(
        {"_id": services(app).queue.tasks.find_one()["_id"]},
        {"$set": {"state": "terminated", "exit_status": "success", "_updated": utcnow()}},
    )
    thread.join()
    assert result["reply"] == {"unfinished": {}, "waited": True}


def test_too_many_held_waits_answer_at_once(store):
    app = make_app(store, WAIT_MAX_WAITERS=1)
    api = app.test_client()
    ((busy, attempt),) = running(api)
    thread, result = held(app, api, {"ids": [busy], "timeout": 20})
    assert wait(api, {"ids": [busy], "timeout": 20}) == {"unfinished": {busy: "running"}, "waited": False}
    finish(api, busy, attempt, "success", 0)
    thread.join()
    assert result["reply"] == {"unfinished": {}, "waited": True}


@pytest.mark.parametrize(
    "body, word",
    [
        ({"ids": "abc"}, "ids"),
        ({"ids": []}, "ids"),
        ({"ids": ["nope"]}, "not a task id"),
        ({"ids": ["0" * 24] * 10001}, "10000"),
        ({"ids": ["0" * 24], "timeout": -1}, "timeout"),
        ({"ids": ["0" * 24], "timeout": "soon"}, "timeout"),
        ({"ids": ["0" * 24], "every": 1}, "unknown field"),
        ({"ids": ["0" * 24], "outcomes": "yes"}, "outcomes"),
    ],
)
def test_bad_waits_are_refused(api, body, word):
    reply = wait(api, body, status=422)
    assert word in reply["_error"]["message"]


def test_client_wait_returns_when_the_task_ends_not_at_the_next_round(live_server):
    from conftest import TEST_TOKEN

    from banyan.client import Client
    from banyan.waiting import wait_for

    client = Client(live_server.url, TEST_TOKEN)
    wid = client.register_worker("w", PLENTY)
    (task_id,) = client.create_tasks([{"command": "x", "state": "available", "name": "quick"}])
    (item,) = client.claim(wid, PLENTY, 1)["_items"]
    rounds = []

    def end_it(progress):
        rounds.append(progress)
        if len(rounds) == 1:  # after the first look: it is running
            threading.Timer(0.2, client.finish, (task_id, item["history"][-1]["attempt"], "success", 0)).start()

    started = time.monotonic()
    result = wait_for(client, [task_id], interval=30, on_progress=end_it)
    assert time.monotonic() - started < 30  # the finish ended the round, not the interval
    assert result.ok and result.tasks[task_id]["exit_status"] == "success"
    assert [p.finished for p in rounds] == [0, 1]


@pytest.mark.parametrize("server_knows_outcomes", [True, False])
def test_client_wait_reads_no_task_after_the_wait_that_says_how_it_ended(live_server, server_knows_outcomes):
    """`Client.wait` reads the tasks once, then learns how they ended from
    the held wait's answer; from a server that does not know `outcomes`
    (422), it reads them after the wait as before."""
    from conftest import TEST_TOKEN

    from banyan.client import Client
    from banyan.errors import BanyanError

    client = Client(live_server.url, TEST_TOKEN)
    wid = client.register_worker("w", PLENTY)
    ids = client.create_tasks([{"command": "x", "state": "available", "name": "n%d" % i} for i in range(2)])
    items = client.claim(wid, PLENTY, 2)["_items"]
    reads, rounds = [], []
    read, held_round = client.tasks_by_id, client.wait_unfinished

    def counted_read(task_ids, *args, **kwargs):
        reads.append(list(task_ids))
        return read(task_ids, *args, **kwargs)

    def round_(task_ids, timeout, outcomes=False):
        rounds.append(outcomes)
        if outcomes and not server_knows_outcomes:
            raise BanyanError(422, "outcomes: unknown field", {"outcomes": "unknown field"})
        if len(rounds) == 1 or not server_knows_outcomes and len(rounds) == 2:
            for item in items:
                client.finish(item["_id"], item["history"][-1]["attempt"], "success", 0)
        return held_round(task_ids, timeout, outcomes)

    client.tasks_by_id, client.wait_unfinished = counted_read, round_
    result = client.wait(ids)
    assert result.ok
    assert {task_id: doc["name"] for task_id, doc in result.tasks.items()} == {ids[0]: "n0", ids[1]: "n1"}
    assert all(doc["current_history"]["exit_status"] == "success" for doc in result.tasks.values())
    if server_knows_outcomes:
        assert rounds == [True] and reads == []
    else:
        assert rounds == [True, False] and reads == [ids, ids]


def test_client_wait_names_missing_tasks_without_waiting_for_the_others(live_server):
    from conftest import TEST_TOKEN

    from banyan.client import Client
    from banyan.waiting import MissingTasks

    client = Client(live_server.url, TEST_TOKEN)
    wid = client.register_worker("w", PLENTY)
    (task_id,) = client.create_tasks([{"command": "x", "state": "available", "name": "busy"}])
    client.claim(wid, PLENTY, 1)
    result = client.wait([task_id], timeout=0)  # timed out: the task as a read shows it
    assert result.timed_out and [(d["_id"], d["name"], d["state"]) for d in result.unfinished] == [
        (task_id, "busy", "running")
    ]
    with pytest.raises(MissingTasks) as raised:
        client.wait([task_id, "0" * 24])
    assert raised.value.task_ids == ["0" * 24]
    reply = client.wait_unfinished([task_id, "0" * 24], 30, outcomes=True)
    assert reply == {"unfinished": {task_id: "running"}, "waited": True, "finished": {}, "missing": ["0" * 24]}
    assert client.get_task(task_id)["state"] == "running"


def test_a_stopping_server_answers_its_held_claims_and_waits_at_once(store):
    """At a stop (SIGTERM or Ctrl-C) `banyan server` releases its long polls
    before it closes the store: a held claim is answered as one turned away
    (nothing claimed, `retry_after`), a held wait and a held `/changes` as
    at their end (re-checks every 60 s, polls of 20 s: only the release
    ends them), and no long poll is held anew."""
    app = make_app(store, CLAIM_RECHECK_INTERVAL=60, WAIT_RECHECK_INTERVAL=60, CHANGES_RECHECK_INTERVAL=60)
    api = app.test_client()
    ((busy, _),) = running(api)
    idle = register(api)
    version = api.get("/changes").json["version"]
    claiming, claimed = conftest.held(lambda: claim(api, idle, wait=20), lambda: len(services(app).claim_waiters))
    waiting, waited = held(app, api, {"ids": [busy], "timeout": 20})
    following, followed = conftest.held(
        lambda: api.get("/changes?since=%s&timeout=20" % version).json, lambda: services(app).changes_waiters.held
    )
    serve._release_held(services(app))
    claiming.join()
    waiting.join()
    following.join()
    assert claimed["reply"]["_items"] == [] and claimed["reply"]["retry_after"] > 0
    assert waited["reply"] == {"unfinished": {busy: "running"}, "waited": True}
    assert followed["reply"]["changed"] is False and followed["reply"]["version"] == version
    assert claim(api, idle, wait=20)["retry_after"] > 0  # turned away, not held
    assert wait(api, {"ids": [busy], "timeout": 20}) == {"unfinished": {busy: "running"}, "waited": False}
    assert api.get("/changes?since=%s&timeout=20" % version).json["retry_after"] > 0
    assert len(services(app).claim_waiters) == len(services(app).finish_waiters) == 0
