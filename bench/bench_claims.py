"""Batch-claim throughput and long-poll wake-up latency on the embedded store.

    /work/venv/bin/python bench/bench_claims.py [--sizes 1000 10000 100000] [--claim 2000]

For each queue size: a fresh embedded store (in a temporary directory, with
its journal and fsyncs, as `banyan server` runs it) holding that many ready
tasks; then `POST /workers/<wid>/claim` through the app (Flask test client,
no sockets) with `max_tasks` 64 until `--claim` tasks are claimed, by one
claimer and by 4 concurrent claimers. Then the long poll: a claim waiting
on an empty queue, and the time from the start of the `PATCH` that makes a
task available to the claim returning it; and the same when the task is made
ready behind the server's back (another server process, in Mongo mode), which
only the periodic re-check finds.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid

from benchkit import timed_threads

from banyan.server.app import create_app
from banyan.server.services import services
from banyan.server.states import utcnow
from banyan.server.store import connect

FREE = {"cores": 64, "memory": 1 << 40, "gpus": 0}


def seed(app, n, **fields):
    now = utcnow().replace(microsecond=0)
    for start in range(0, n, 10000):
        docs = []
        for i in range(start, min(n, start + 10000)):
            doc = {
                "command": "echo %d" % i,
                "state": "available",
                "priority": i % 10,
                "max_retries": 0,
                "requested_resources": {"cores": 1, "memory": 1 << 20, "gpus": 0},
                "time_limit": None,
                "continuations": [],
                "_created": now,
                "_updated": now,
                "_etag": uuid.uuid4().hex,
            }
            doc.update(fields)
            docs.append(doc)
        services(app).queue.prepare_new(docs)
        services(app).queue.tasks.insert_many(docs)


def fresh_app(tmp, **config):
    client = connect(data_dir=tempfile.mkdtemp(dir=tmp))
    app = create_app(client, dict({"MONGO_DBNAME": "bench"}, **config))
    return client, app


def register(api):
    return api.post("/workers", json={"host": "bench", "resources": FREE}).json["_id"]


def claim_until(api, wid, target, counter, lock):
    while True:
        with lock:
            if counter[0] >= target:
                return
        r = api.post("/workers/%s/claim" % wid, json={"free": FREE, "max_tasks": 64})
        assert r.status_code == 200, r.json
        got = len(r.json["_items"])
        with lock:
            counter[0] += got
        if not got:
            return


def throughput(app, target, claimers):
    api = app.test_client()
    wids = [register(api) for _ in range(claimers)]
    counter, lock = [0], threading.Lock()
    threads = [threading.Thread(target=claim_until, args=(api, w, target, counter, lock)) for w in wids]
    took = timed_threads(threads)
    return counter[0], took


def bench_throughput(tmp, sizes, target):
    print("batch claims (max_tasks 64), embedded store:")
    print("  %8s  %9s  %14s  %14s" % ("queued", "seed s", "1 claimer /s", "4 claimers /s"))
    for n in sizes:
        client, app = fresh_app(tmp)
        started = time.perf_counter()
        seed(app, n)
        seeded = time.perf_counter() - started
        want = min(target, n // 2)
        got1, took1 = throughput(app, want, 1)
        got4, took4 = throughput(app, want, 4)
        print(
            "  %8d  %9.1f  %14.0f  %14.0f   (%d and %d tasks claimed)"
            % (n, seeded, got1 / took1, got4 / took4, got1, got4)
        )
        client.close()


def wait_for_waiter(app):
    deadline = time.monotonic() + 10
    while len(services(app).claim_waiters) == 0 and time.monotonic() < deadline:
        time.sleep(0.001)


def bench_long_poll(tmp, rounds, backlog):
    for path in ("on_ready wake-up (PATCH in this process)", "periodic re-check (made ready elsewhere)"):
        client, app = fresh_app(tmp, CLAIM_RECHECK_INTERVAL=0.5)
        if backlog:
            seed(app, backlog, requested_resources={"cores": 1, "memory": 0, "gpus": 1})  # never fits
        api = app.test_client()
        wid = register(api)
        latencies = []
        for _i in range(rounds):
            tid = api.post("/tasks", json={"command": "x"}).json["_id"]
            result = {}

            def poll():
                r = api.post("/workers/%s/claim" % wid, json={"free": FREE, "max_tasks": 1, "wait": 10})
                result["done"] = time.perf_counter()
                result["items"] = r.json["_items"]

            poller = threading.Thread(target=poll)
            poller.start()
            wait_for_waiter(app)
            time.sleep(0.05)  # let it settle into its wait
            started = time.perf_counter()
            if path.startswith("on_ready"):
                r = api.patch("/tasks/%s" % tid, json={"state": "available"})
                assert r.status_code == 200, r.json
            else:
                from bson import ObjectId

                services(app).queue.tasks.update_one({"_id": ObjectId(tid)}, {"$set": {"state": "available"}})
            poller.join()
            assert [t["_id"] for t in result["items"]] == [tid], result
            latencies.append(result["done"] - started)
        latencies.sort()
        print(
            "long poll, %s, %d non-fitting tasks queued, %d rounds: median %.1f ms, p90 %.1f ms, max %.1f ms"
            % (
                path,
                backlog,
                rounds,
                1000 * statistics.median(latencies),
                1000 * latencies[int(0.9 * (len(latencies) - 1))],
                1000 * latencies[-1],
            )
        )
        client.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--claim", type=int, default=2000, help="tasks to claim per measurement")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="banyan-bench-")
    try:
        bench_throughput(tmp, args.sizes, args.claim)
        bench_long_poll(tmp, args.rounds, 0)
        bench_long_poll(tmp, args.rounds, 10000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
