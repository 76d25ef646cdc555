"""The server's CPU per task on the worker protocol, in process (embedded store).

    .venv/bin/python bench/bench_server_cpu.py [--tasks 1000] [--graph 500] [--repeats 3]

What `bench_peers.py`'s W1 and W2 cost the server, without the worker,
the tasks and the sockets, measured as CPU time of this process (not the
wall clock), so that a busy shared machine changes the figures less:

W1  POST `--tasks` available tasks in one request, then a worker of one
    core sends `POST /workers/<wid>/claim` (max_tasks 32, as banyan-worker
    asks) carrying the report of the task it claimed last, until none is left.
W2  POST a sink, `--graph` tasks before it and one before them (bench_peers'
    1 -> n -> 1), then the same loop until the sink has run.

Each request goes through the app as `banyan server` runs it (Flask's test
client; the store syncs its journal before each answer), with `/stats`'
views defined on the new store as its start defines them
(`serve.define_stats_views`; `--no-stats-views`: without, as before). Prints the POST's
CPU per task and the loop's CPU per task run (the best of `--repeats`
fresh stores). Asserts nothing.
"""

import argparse
import shutil
import tempfile
import time

from banyan.server.app import create_app
from banyan.server.serve import define_stats_views
from banyan.server.store import connect

FREE = {"cores": 1, "memory": 1 << 33, "gpus": 0}


class Server:
    """A fresh app on an embedded store in a temporary directory, with one worker."""

    def __init__(self, stats_views=True):
        self.tmp = tempfile.mkdtemp(prefix="bench-server-cpu-")
        self.client = connect(data_dir=self.tmp)
        app = create_app(self.client, {"AUTH": False})
        if stats_views:
            define_stats_views(app)
        self.api = app.test_client()
        reply = self.api.post("/workers", json={"host": "bench", "resources": FREE})
        self.worker = reply.get_json()["_id"]

    def post(self, body):
        reply = self.api.post("/tasks", json=body)
        assert reply.status_code == 201, reply.get_data()
        data = reply.get_json()
        return [item["_id"] for item in data["_items"]] if "_items" in data else [data["_id"]]

    def run_all(self):
        """Report and claim until nothing is left to claim; returns how many ran."""
        last, ran = None, 0
        while True:
            body = {"free": FREE, "max_tasks": 32, "wait": 0}
            if last:
                body["finished"] = [
                    {
                        "task": last[0],
                        "attempt": last[1],
                        "outcome": "success",
                        "exit_code": 0,
                        "stdout": "",
                        "stderr": "",
                    }
                ]
            reply = self.api.post("/workers/%s/claim" % self.worker, json=body)
            assert reply.status_code == 200, reply.get_data()
            items = reply.get_json()["_items"]
            if not items and last is None:
                return ran
            ran += len(items)
            last = (items[0]["_id"], items[0]["history"][-1]["attempt"]) if items else None

    def close(self):
        self.client.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def w1(n, stats_views):
    server = Server(stats_views)
    try:
        start = time.process_time()
        server.post([{"command": "true", "state": "available"} for _ in range(n)])
        posted = time.process_time()
        ran = server.run_all()
        return (posted - start) / n, (time.process_time() - posted) / ran
    finally:
        server.close()


def w2(n, stats_views):
    server = Server(stats_views)
    try:
        start = time.process_time()
        sink = server.post({"command": "true"})
        middle = server.post([{"command": "true", "continuations": sink} for _ in range(n)])
        server.post({"command": "true", "continuations": middle, "state": "available"})
        posted = time.process_time()
        ran = server.run_all()
        return (posted - start) / (n + 2), (time.process_time() - posted) / ran
    finally:
        server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--graph", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-stats-views", dest="stats_views", action="store_false")
    args = parser.parse_args()
    for name, run, n in (("W1", w1, args.tasks), ("W2", w2, args.graph)):
        runs = [run(n, args.stats_views) for _ in range(args.repeats)]
        post, loop = min(r[0] for r in runs), min(r[1] for r in runs)
        print(
            "%s (%d tasks): POST %.2f ms CPU per task; report + claim %.2f ms CPU per task run (best of %d)"
            % (name, n, post * 1000, loop * 1000, args.repeats),
            flush=True,
        )


if __name__ == "__main__":
    main()
