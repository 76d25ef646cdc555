"""A cluster's worth of workers on one server: 300 simulated workers (light
clients speaking the worker protocol, tests/simulated_workers.py) and 4
real `banyan-worker` processes share a queue of tasks. None is lost, none
is run twice, each is recorded as the one that ran it reported it, and a
user's `GET /tasks/<id>` is answered throughout, never stalled behind the
workers (300 workers also keep more connections open than waitress's
default limit of 100; the stall the issue saw left a `curl` unanswered for
20 s). The test asserts only that no read starved (p99 under 2 s), so it
does not pass or fail with the machine's speed. The p99 itself is printed
and kept in the reliability table, and bench/bench_many_workers.py measures
it against the issue's 200 ms: 74-80 ms on the shared 2-core machine, 2,000
and 10,000 tasks; on FerretDB, where every read is a round trip to a
database on the same 2 cores, 220-360 ms.

BANYAN_MANY_WORKERS_TASKS sets the number of tasks (the issue's figure is
10,000; CI runs fewer), BANYAN_MANY_WORKERS_SIMULATED the simulated workers.
On FerretDB (BANYAN_TEST_MONGO_URI) both default lower: one server process
on FerretDB 1.24 (on PostgreSQL, on the suite's 2 cores) claims a few tasks
a second (each claim several round trips, its update under a document lock),
and with 50 simulated workers claims queued for seconds there; 20 simulated
and 4 real workers, 300 tasks, take one to two minutes.
"""

import json
import os
import time

import pytest
import requests
from conftest import MONGO_URI, TEST_TOKEN, LiveServer
from harness import Worker, read_markers, record
from simulated_workers import Fleet, LatencyProbe

TASKS = int(os.environ.get("BANYAN_MANY_WORKERS_TASKS", "300" if MONGO_URI else "2000"))
SIMULATED = int(os.environ.get("BANYAN_MANY_WORKERS_SIMULATED", "20" if MONGO_URI else "300"))
#: Seconds per task the run may take beyond two minutes.
SECONDS_PER_TASK = 0.5 if MONGO_URI else 0.1
REAL_WORKERS, REAL_CORES = 4, 2
#: The real workers' heartbeat interval (their own timeout, 3 intervals, is
#: how long they keep tasks without an acknowledged heartbeat): on FerretDB
#: a heartbeat took over 2 s at times, and a worker with 2 s gave up its
#: registration and handed back a task it had claimed.
REAL_HEARTBEAT = 5 if MONGO_URI else 2
#: A user's single-task reads: a 99th percentile over this means reads
#: starved behind the workers (a speed goal is the benchmark's, not a test's).
USER_GET_STARVED = 2.0
#: Tasks per POST while the workers already work.
SUBMIT_CHUNK = 100

#: What a task does on a real worker: refuse a second run of an attempt
#: (noted in DUPLICATES), leave a marker, exit with $EXIT.
SCRIPT = (
    'f="$M/$BANYAN_TASK_ID.$BANYAN_ATTEMPT"; '
    'if [ -e "$f" ]; then echo "$BANYAN_TASK_ID.$BANYAN_ATTEMPT" >> "$M/DUPLICATES"; exit 99; fi; '
    'echo started > "$f"; echo "exit $EXIT" >> "$f"; exit "$EXIT"'
)

pytestmark = pytest.mark.slow


def exit_code_of(task):
    """Every seventh task fails with exit code 3, on a real worker or a simulated one."""
    return int(task["environment"]["EXIT"])


def simulated_outcome(task):
    code = exit_code_of(task)
    return ("success" if code == 0 else "failure"), code


def test_300_simulated_and_4_real_workers_share_10000_tasks(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    server = LiveServer(tmp_path / "server-data").start()
    http = requests.Session()
    if TEST_TOKEN:
        http.headers["Authorization"] = "Bearer " + TEST_TOKEN
    real = [
        Worker(
            server.url,
            tmp_path / ("work%d" % i),
            tmp_path / ("worker%d.log" % i),
            cores=REAL_CORES,
            heartbeat=REAL_HEARTBEAT,
            claim_wait=5,
            host="real%d" % i,
            token=TEST_TOKEN,
        ).start()
        for i in range(REAL_WORKERS)
    ]
    fleet = Fleet(
        server.url,
        SIMULATED,
        token=TEST_TOKEN,
        claim_wait=5,
        heartbeat=5,
        run_seconds=0.02,
        outcome_of=simulated_outcome,
    )
    probe = None
    try:
        fleet.start()
        # the user's task, read throughout
        r = http.post(server.url + "/tasks", json={"name": "watched", "command": "true"})
        assert r.status_code == 201, r.text
        probe = LatencyProbe(server.url, r.json()["_id"], tmp_path / "latencies", token=TEST_TOKEN).start()
        ids = []
        for start in range(0, TASKS, SUBMIT_CHUNK):
            chunk = [
                {
                    "name": "t%d" % i,
                    "command": SCRIPT,
                    "state": "available",
                    "max_retries": 0,
                    "environment": {"M": str(markers), "EXIT": "3" if i % 7 == 3 else "0"},
                }
                for i in range(start, min(TASKS, start + SUBMIT_CHUNK))
            ]
            r = http.post(server.url + "/tasks", json=chunk, timeout=120)
            assert r.status_code == 201, r.text[:2000]
            ids += [item["_id"] for item in r.json()["_items"]]
        deadline = time.monotonic() + 120 + TASKS * SECONDS_PER_TASK
        where = json.dumps({"state": {"$nin": ["terminated", "cancelled"]}, "name": {"$ne": "watched"}})
        while True:
            left = http.get(server.url + "/tasks", params={"where": where, "max_results": 1}).json()["_meta"]["total"]
            if left == 0:
                break
            assert time.monotonic() < deadline, "%d tasks still unfinished" % left
            time.sleep(0.5)
        probe.stop()
        real_ids = {
            w["_id"] for w in http.get(server.url + "/workers").json()["_items"] if w["host"].startswith("real")
        }
        tasks = {}
        page = 1
        while True:
            body = http.get(
                server.url + "/tasks",
                params={
                    "where": json.dumps({"name": {"$ne": "watched"}}),
                    "max_results": 5000,
                    "page": page,
                    "projection": json.dumps(
                        {"state": 1, "exit_status": 1, "history": 1, "environment": 1, "lost_count": 1}
                    ),
                },
            ).json()
            tasks.update((t["_id"], t) for t in body["_items"])
            if len(body["_items"]) < 5000:
                break
            page += 1
    finally:
        if probe is not None:
            probe.stop()
        fleet.stop()
        for worker in real:
            worker.stop()
        server.stop()
        http.close()

    # none lost
    assert len(ids) == TASKS and set(tasks) == set(ids)
    # none run twice: each task was given out once, to one worker, and ran once
    simulated = {}
    for run in fleet.runs:
        simulated.setdefault(run.task_id, []).append(run)
    runs, duplicates = read_markers(markers)
    assert duplicates == []
    assert [t for t, given in simulated.items() if len(given) > 1] == []
    assert [t for t, attempts in runs.items() if len(attempts) > 1] == []
    both = set(simulated) & set(runs)
    assert both == set(), [
        (t, tasks.get(t, {}).get("history"), runs[t], [(r.worker, r.attempt, r.status) for r in simulated[t]])
        for t in sorted(both)[:5]
    ]
    assert set(simulated) | set(runs) == set(ids)
    # none recorded wrongly: one attempt, by the worker that ran it, ended as it ended
    wrong = []
    for task_id, task in tasks.items():
        expected_code = exit_code_of(task)
        history = task["history"]
        entry = history[-1] if history else {}
        if task_id in simulated:
            ran_by, reported = simulated[task_id][0].worker, simulated[task_id][0].status
            if reported != 200:
                wrong.append((task_id, "report answered %s" % reported))
        else:
            ran_by = entry.get("worker") if entry.get("worker") in real_ids else "a real worker"
            if runs[task_id] != {1: expected_code}:
                wrong.append((task_id, "markers %s" % runs[task_id]))
        recorded = (
            task["state"],
            task["exit_status"],
            len(history),
            entry.get("worker"),
            entry.get("exit_code"),
            task.get("lost_count"),
        )
        if recorded != ("terminated", "success" if expected_code == 0 else "failure", 1, ran_by, expected_code, 0):
            wrong.append((task_id, recorded))
    assert wrong == [], wrong[:20]
    assert fleet.errors == []
    assert server.server_errors() == []
    # both kinds of worker did some of the work
    assert len(simulated) > 0 and len(runs) > 0
    # a user's read was answered throughout
    assert probe.statuses and set(probe.statuses) == {200}, set(probe.statuses)
    p99 = probe.p99()
    print(
        "\n%d tasks, %d simulated + %d real workers: %d by simulated, %d by real; user GET p99 %.1f ms "
        "(max %.1f ms, %d reads)"
        % (
            TASKS,
            SIMULATED,
            REAL_WORKERS,
            len(simulated),
            len(runs),
            p99 * 1000,
            max(probe.seconds) * 1000,
            len(probe.seconds),
        )
    )
    record(
        "many workers, %d tasks" % TASKS,
        load="%d tasks, %d simulated + %d real workers" % (TASKS, SIMULATED, REAL_WORKERS),
        lost=0,
        duplicates=0,
        violations=0,
        faults="user GET p99 %.0f ms, max %.0f ms" % (p99 * 1000, max(probe.seconds) * 1000),
    )
    assert p99 < USER_GET_STARVED, "user GET p99 %.0f ms" % (p99 * 1000)
