"""Statistics (`/stats`, `/stats/workers`, `/metrics`) on tasks and workers
whose figures are known: documents are inserted straight into the store."""

from datetime import datetime, timedelta, timezone

import pytest
from bson import ObjectId
from prometheus_client.parser import text_string_to_metric_families

from banyan.server import stats
from banyan.server.app import create_app
from banyan.server.auth import TokenStore
from banyan.server.states import ABANDONED, CANCELLED, FAILURE, SUCCESS, TaskQueue

GiB = 1024**3
NOW = datetime(2026, 3, 1, 12, 30, 30, tzinfo=timezone.utc)
W1, W2, W3 = ObjectId(), ObjectId(), ObjectId()


def attempt(number, started, runtime=None, status=None, worker=W1):
    return {
        "attempt": number,
        "worker": worker,
        "host": "node",
        "started": started,
        "ended": started + timedelta(seconds=runtime) if runtime is not None else None,
        "exit_status": status,
        "exit_code": 0 if status == SUCCESS else (1 if status else None),
        "usage": None,
        "progress": None,
    }


def task(name, state, created, history=(), exit_status=None, worker=None, resources=None, owner=None, **extra):
    doc = {
        "_id": ObjectId(),
        "name": name,
        "command": "true",
        "state": state,
        "_created": created,
        "_updated": created,
        "_etag": "x",
        "history": list(history),
        "exit_status": exit_status,
        "worker": worker,
        "requested_resources": resources or {"cores": 1, "memory": 0, "gpus": 0},
        "pending_dependency_count": 0,
        "pending_parents": [],
        "retry_count": 0,
        "max_retries": 0,
        "continuations": [],
        "owner": owner,
        "priority": 0,
    }
    doc.update(extra)
    return doc


def ended_at(end, runtime):
    """The start of an attempt of `runtime` seconds that ended at `end`."""
    return end - timedelta(seconds=runtime)


def known_tasks(now):
    """Eight tasks. Finished attempts run 10, 20, 30, 40 and 100 s; the five
    tasks that started waited 5, 15, 25, 75 and 35 s for their first start."""
    a1 = ended_at(now - timedelta(minutes=2), 10)  # 12:28:30, in the window
    b1 = ended_at(now - timedelta(minutes=2), 20)  # same minute
    b2 = ended_at(now - timedelta(seconds=20), 30)  # 12:30:10, current minute
    c1 = ended_at(now - timedelta(hours=2), 100)  # outside the last hour
    c2 = ended_at(now - timedelta(minutes=90), 40)  # outside the last hour
    d1 = now - timedelta(minutes=5)
    h1 = now - timedelta(minutes=3)
    return [
        task("A", "terminated", a1 - timedelta(seconds=5), [attempt(1, a1, 10, SUCCESS)], SUCCESS),
        task(
            "B",
            "terminated",
            b1 - timedelta(seconds=15),
            [attempt(1, b1, 20, FAILURE), attempt(2, b2, 30, FAILURE)],
            FAILURE,
            retry_count=1,
            max_retries=1,
        ),
        task(
            "C",
            "terminated",
            c1 - timedelta(seconds=25),
            [attempt(1, c1, 100, ABANDONED, worker=W3), attempt(2, c2, 40, SUCCESS)],
            SUCCESS,
            retry_count=1,
            max_retries=3,
        ),
        task(
            "D",
            "running",
            d1 - timedelta(seconds=75),
            [attempt(1, d1)],
            worker=W1,
            resources={"cores": 2, "memory": GiB, "gpus": 1},
        ),
        task("E", "available", now - timedelta(minutes=1)),
        task("F", "inactive", now - timedelta(minutes=1)),
        task("G", "cancelled", now - timedelta(minutes=1), exit_status=CANCELLED),
        task(
            "H",
            "pending_cancellation",
            h1 - timedelta(seconds=35),
            [attempt(1, h1)],
            worker=W1,
            resources={"cores": 1, "memory": GiB // 2, "gpus": 0},
        ),
    ]


def known_workers(now):
    return [
        {
            "_id": W1,
            "host": "node1",
            "state": "active",
            "last_heartbeat": now,
            "resources": {"cores": 8, "memory": 16 * GiB, "gpus": 2},
        },
        {
            "_id": W2,
            "host": "node2",
            "state": "active",
            "last_heartbeat": now,
            "resources": {"cores": 4, "memory": 8 * GiB, "gpus": 0},
        },
        {
            "_id": W3,
            "host": "node3",
            "state": "lost",
            "last_heartbeat": now - timedelta(hours=1),
            "resources": {"cores": 4, "memory": 8 * GiB, "gpus": 0},
        },
    ]


@pytest.fixture
def known(db):
    """The known tasks as an earlier version stored them, with the figures
    the server now keeps (`queue_wait`, `runtime`) filled in as at start."""
    db["tasks"].insert_many(known_tasks(NOW))
    db["workers"].insert_many(known_workers(NOW))
    TaskQueue(db).fill_stored_figures()
    return db


def test_figures_of_known_tasks(known):
    s = stats.task_stats(known, {}, now=NOW)
    assert s["total"] == 8
    assert s["states"] == {
        "inactive": 1,
        "available": 1,
        "running": 1,
        "pending_cancellation": 1,
        "cancelled": 1,
        "terminated": 3,
    }
    assert s["outcomes"] == {SUCCESS: 2, FAILURE: 1, CANCELLED: 1, "timeout": 0, ABANDONED: 0, "oom": 0}
    assert (s["succeeded"], s["failed"]) == (2, 1)

    attempts = s["attempts"]
    assert attempts["count"] == 5
    assert attempts["by_exit_status"] == {SUCCESS: 2, FAILURE: 2, ABANDONED: 1, CANCELLED: 0, "timeout": 0, "oom": 0}
    # 10, 20, 30, 40, 100: p95 is the 5th of 5 (nearest rank ceil(4.75)).
    assert attempts["runtime"] == {"count": 5, "mean": 40.0, "median": 30.0, "p95": 100.0, "max": 100.0}

    # 5, 15, 25, 35, 75
    assert s["queue_wait"] == {"count": 5, "mean": 31.0, "median": 25.0, "p95": 75.0, "max": 75.0}

    t = s["throughput"]
    assert t["since"] == datetime(2026, 3, 1, 11, 31, tzinfo=timezone.utc)
    assert len(t["per_minute"]) == 60
    assert (t["finished"], t["succeeded"]) == (3, 1)
    assert t["per_minute_mean"] == pytest.approx(3 / 60)
    busy = {i: (b["minute"], b["finished"], b["succeeded"]) for i, b in enumerate(t["per_minute"]) if b["finished"]}
    assert busy == {
        57: (datetime(2026, 3, 1, 12, 28, tzinfo=timezone.utc), 2, 1),
        59: (datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc), 1, 0),
    }


def test_even_count_median_is_the_mean_of_the_middle_two(db):
    start = NOW - timedelta(hours=3)
    db["tasks"].insert_many(
        [task("t%d" % r, "terminated", start, [attempt(1, start, r, SUCCESS)], SUCCESS) for r in (1, 2, 3, 10)]
    )
    TaskQueue(db).fill_stored_figures()
    runtime = stats.task_stats(db, {}, now=NOW)["attempts"]["runtime"]
    assert runtime == {"count": 4, "mean": 4.0, "median": 2.5, "p95": 10.0, "max": 10.0}


def test_no_tasks_gives_zeros_and_no_figures(db):
    s = stats.task_stats(db, {}, now=NOW)
    assert s["total"] == 0 and set(s["states"].values()) == {0}
    assert s["attempts"]["runtime"] == {"count": 0, "mean": None, "median": None, "p95": None, "max": None}
    assert s["queue_wait"]["count"] == 0
    assert s["throughput"]["finished"] == 0


def test_a_filter_narrows_every_figure(known):
    s = stats.task_stats(known, {"name": {"$in": ["A", "B"]}}, now=NOW)
    assert s["total"] == 2 and s["states"]["terminated"] == 2
    assert s["attempts"]["runtime"] == {"count": 3, "mean": 20.0, "median": 20.0, "p95": 30.0, "max": 30.0}
    assert s["queue_wait"]["count"] == 2 and s["queue_wait"]["mean"] == 10.0
    assert s["throughput"]["finished"] == 3


def test_worker_load(known):
    load = stats.worker_load(known)
    items = {w["host"]: w for w in load["_items"]}
    assert [w["host"] for w in load["_items"]] == ["node1", "node2", "node3"]  # active first
    w1 = items["node1"]
    assert (w1["_id"], w1["state"], w1["running"]) == (W1, "active", 2)
    assert w1["used"] == {"cores": 3, "memory": GiB + GiB // 2, "gpus": 1}
    assert w1["resources"] == {"cores": 8, "memory": 16 * GiB, "gpus": 2}
    assert w1["load"] == {"cores": 3 / 8, "memory": 1.5 / 16, "gpus": 0.5}
    assert items["node2"]["running"] == 0 and items["node2"]["load"]["gpus"] is None
    assert items["node3"]["state"] == "lost"
    assert load["summary"] == {
        "workers": 3,
        "states": {"active": 2, "lost": 1, "stopped": 0},
        "running": 2,
        "cores": {"used": 3, "total": 12},
        "memory": {"used": GiB + GiB // 2, "total": 24 * GiB},
        "gpus": {"used": 1, "total": 2},
    }


def test_tasks_held_by_an_unregistered_worker_are_listed(db):
    stranger = ObjectId()
    db["tasks"].insert_one(
        task(
            "x",
            "running",
            NOW,
            [attempt(1, NOW, worker=stranger)],
            worker=stranger,
            resources={"cores": 4, "memory": 0, "gpus": 0},
        )
    )
    (item,) = stats.worker_load(db)["_items"]
    assert (item["_id"], item["state"], item["running"], item["used"]["cores"]) == (stranger, "unknown", 1, 4)


# -- over HTTP -------------------------------------------------------------


def test_http_stats_equal_the_computed_ones(api, known):
    body = api.get("/stats").json
    s = stats.task_stats(known, {})
    assert body["total"] == 8 and body["states"] == s["states"]
    assert body["attempts"] == s["attempts"] and body["queue_wait"] == s["queue_wait"]
    assert len(body["throughput"]["per_minute"]) == 60
    assert isinstance(body["throughput"]["since"], str) and body["now"].endswith("Z")

    workers = api.get("/stats/workers").json
    w1 = next(w for w in workers["_items"] if w["_id"] == str(W1))
    assert w1["running"] == 2 and w1["used"]["cores"] == 3
    assert workers["summary"]["cores"] == {"used": 3, "total": 12}


def test_http_where_filter(api, known):
    body = api.get("/stats", query_string={"where": '{"state": "terminated"}'}).json
    assert body["total"] == 3 and body["attempts"]["count"] == 5
    body = api.get("/stats", query_string={"where": 'name=="D"'}).json  # Eve's python syntax
    assert body["total"] == 1 and body["states"]["running"] == 1


@pytest.mark.parametrize(
    "where",
    [
        "[1]",
        "null",
        '{"$where": "1"}',
        '{"name": {"$regex": "A"}}',
        "garbage((",
        '{"x": {"$foo": 1}}',
        '{"state": {"$in": 5}}',
        '{"$and": []}',
        '{"$or": 3}',
        # refused by the store only for a task that is not the first one
        '{"$or": [{"name": "A"}, {"name": {"$mod": [0, 0]}}]}',
    ],
)
def test_http_bad_where_is_a_400(api, known, where):
    r = api.get("/stats", query_string={"where": where})
    assert r.status_code == 400, r.json
    assert r.json["_error"]["message"]


def test_metrics_in_prometheus_text_format(api, known):
    r = api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(r.data.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("banyan_tasks", (("state", "running"),))] == 1
    assert samples[("banyan_tasks", (("state", "terminated"),))] == 3
    assert samples[("banyan_attempts_finished_total", (("exit_status", "failure"),))] == 2
    assert samples[("banyan_attempt_runtime_seconds", (("stat", "median"),))] == 30
    assert samples[("banyan_attempt_runtime_seconds", (("stat", "p95"),))] == 100
    assert samples[("banyan_queue_wait_seconds", (("stat", "mean"),))] == 31
    assert samples[("banyan_workers", (("state", "lost"),))] == 1
    node1 = (("host", "node1"), ("worker", str(W1)))
    assert samples[("banyan_worker_running_tasks", node1)] == 2
    labels = (("host", "node1"), ("resource", "cores"), ("worker", str(W1)))
    assert samples[("banyan_worker_resources_used", labels)] == 3
    assert samples[("banyan_worker_resources_total", labels)] == 8
    assert not any(labels and dict(labels).get("host") == "node3" for _, labels in samples)  # lost: no load


def test_dashboard_page_is_served(api):
    r = api.get("/dashboard")
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.data.decode()
    for element in (
        "count-available",
        "runtime-p95",
        "throughput-chart",
        "workers-body",
        "tasks-body",
        "attempts-body",
    ):
        assert 'id="%s"' % element in page


# -- authentication --------------------------------------------------------


@pytest.fixture
def auth_api(store):
    client, dbname = store
    application = create_app(client, {"MONGO_DBNAME": dbname, "TESTING": True, "AUTH": True})
    db = client[dbname]
    tokens = TokenStore(db)
    _, admin = tokens.create("admin", "root")
    _, alice = tokens.create("user", "alice")
    _, worker = tokens.create("worker", "w")
    docs = known_tasks(NOW)
    for doc in docs:
        doc["owner"] = "alice" if doc["name"] in ("A", "D", "F") else "bob"
    db["tasks"].insert_many(docs)
    db["workers"].insert_many(known_workers(NOW))
    TaskQueue(db).fill_stored_figures()
    return application.test_client(), {"admin": admin, "alice": alice, "worker": worker}


def bearer(token):
    return {"Authorization": "Bearer " + token}


def test_stats_need_a_token_when_auth_is_on(auth_api):
    api, tokens = auth_api
    for path in ("/stats", "/stats/workers", "/metrics"):
        assert api.get(path).status_code == 401
        assert api.get(path, headers=bearer("byn_not-a-token")).status_code == 401
    # The page itself holds no data; its figures come from the API with the token.
    assert api.get("/dashboard").status_code == 200


def test_a_user_counts_only_their_own_tasks(auth_api):
    api, tokens = auth_api
    mine = api.get("/stats", headers=bearer(tokens["alice"])).json
    assert mine["total"] == 3
    assert (mine["states"]["terminated"], mine["states"]["running"], mine["states"]["inactive"]) == (1, 1, 1)
    assert mine["attempts"]["count"] == 1
    # A filter cannot reach past the owner restriction.
    sneaky = api.get(
        "/stats",
        headers=bearer(tokens["alice"]),
        query_string={"where": '{"$or": [{"owner": "bob"}, {"owner": "alice"}]}'},
    ).json
    assert sneaky["total"] == 3
    metrics = api.get("/metrics", headers=bearer(tokens["alice"])).data.decode()
    assert 'banyan_tasks{state="terminated"} 1.0' in metrics
    for who in ("admin", "worker"):
        assert api.get("/stats", headers=bearer(tokens[who])).json["total"] == 8
    # Worker load is cluster-wide for every role.
    load = api.get("/stats/workers", headers=bearer(tokens["alice"])).json
    assert load["summary"]["running"] == 2
