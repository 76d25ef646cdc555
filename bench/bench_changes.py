"""What one look of `GET /changes` costs (`changes.version`) as the queue grows.

A held poll looks every CHANGES_RECHECK_INTERVAL (0.5 s), so this is the
store time an open dashboard costs while nothing changes. Builds the app on
a fresh embedded store with --tasks tasks (one user owning 1 in 100, a
bulk submission of 2,000 stamped at one instant), then times a look for an
admin (all tasks) and for that user.

    python bench/bench_changes.py [--tasks 2000 20000]
"""

import argparse
import tempfile
import time
from datetime import timedelta

from benchkit import fill_with_copies

from banyan.server import changes
from banyan.server.app import create_app
from banyan.server.states import utcnow
from banyan.server.store import connect


def timed(fn, repeat=20):
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def run(n):
    with tempfile.TemporaryDirectory() as data_dir:
        client = connect(data_dir=data_dir)
        app = create_app(client, {"MONGO_DBNAME": "bench"})
        app.test_client().post("/tasks", json={"name": "model", "command": "true"})
        db = client["bench"]
        now = utcnow()

        def vary(doc, i):
            doc["owner"] = "u1" if i % 100 == 0 else "u%d" % (2 + i % 7)
            # the newest 2,000 share one instant (a bulk submission)
            doc["_updated"] = now if i >= n - 2001 else now - timedelta(seconds=n - i)

        fill_with_copies(db, n, vary)
        figures = [
            ("admin", timed(lambda: changes.version(db, {}))),
            ("user", timed(lambda: changes.version(db, {"owner": "u1"}))),
        ]
        client.close()
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2000, 20000])
    args = parser.parse_args()
    for n in args.tasks:
        for who, seconds in run(n):
            print("%6d tasks  %-5s  one look %.1f ms" % (n, who, seconds * 1000))


if __name__ == "__main__":
    main()
