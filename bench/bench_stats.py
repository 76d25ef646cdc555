"""`GET /stats` time on the embedded store as the queue grows.

Builds the app in this process on a fresh embedded store, stores --tasks
task documents directly (half of them finished, with one attempt each, as a
busy queue has), then times `GET /stats` and each of its pipelines.

    python bench/bench_stats.py [--tasks 10000 100000]
"""

import argparse
import tempfile
import time
from datetime import timedelta

from benchkit import fill_with_copies
from bson import ObjectId

from banyan.server import stats
from banyan.server.app import create_app
from banyan.server.states import utcnow
from banyan.server.store import connect


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(n):
    with tempfile.TemporaryDirectory() as data_dir:
        client = connect(data_dir=data_dir)
        app = create_app(client, {"MONGO_DBNAME": "bench"})
        api = app.test_client()
        api.post("/tasks", json={"name": "model", "command": "true", "requested_resources": {"memory": "1 MiB"}})
        db = client["bench"]
        now = utcnow()

        def vary(doc, i):
            if i % 2:
                doc.update(
                    state="terminated",
                    exit_status="success",
                    history=[
                        {
                            "worker": ObjectId(),
                            "started": now - timedelta(seconds=90),
                            "ended": now - timedelta(seconds=i % 60),
                            "exit_status": "success",
                        }
                    ],
                )

        fill_with_copies(db, n, vary)
        parts = [
            ("state counts", lambda: stats.state_counts(db.tasks, {})),
            ("attempts", lambda: stats.attempt_stats(db.tasks, {})),
            ("queue wait", lambda: stats.queue_wait_stats(db.tasks, {})),
            ("throughput", lambda: stats.throughput(db.tasks, {}, now)),
        ]
        figures = [(name, timed(fn)) for name, fn in parts]
        response = [None]
        total = timed(lambda: response.__setitem__(0, api.get("/stats")))
        assert response[0].status_code == 200 and response[0].get_json()["total"] == n
        client.close()
    return figures, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10000, 100000])
    args = parser.parse_args()
    print("%-10s %8s %8s %8s %8s %10s" % ("tasks", "states", "attempts", "wait", "thruput", "GET /stats"))
    for n in args.tasks:
        figures, total = run(n)
        print("%-10d %7.2fs %7.2fs %7.2fs %7.2fs %9.2fs" % ((n,) + tuple(t for _, t in figures) + (total,)))


if __name__ == "__main__":
    main()
