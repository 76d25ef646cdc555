"""One server on the embedded store, one on a database, three on one database.

    python bench/bench_servers.py [--mongo-uri URI] [--tasks 2000] [--claimers 4]

Without --mongo-uri it starts a FerretDB of its own on a PostgreSQL of its
own (scripts/ferretdb.sh, in a temporary directory). For each set-up, with real `banyan server`
and `banyan-worker` processes on this machine:

claims  --tasks ready tasks, then --claimers threads (each a registered
        worker, spread over the servers) claim them with
        `POST /workers/<id>/claim` (max_tasks 64) until none is left:
        tasks claimed per second.
W1      --tasks `true` tasks, 2 workers x 1 core (spread over the servers),
        one bulk POST; makespan as the client sees it (a count of unfinished
        tasks every 50 ms, or 4 times as long as the count takes, through the
        servers in turn) and tasks/s.
wake    (several servers only) a claim waiting in one server, a task made
        available through another: time from the PATCH to the claim's
        answer, median of 10 (the re-check interval bounds it).

It prints the figures; it asserts nothing.
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import requests
from benchkit import stop_processes, timed_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SCRIPT = os.path.join(ROOT, "scripts", "ferretdb.sh")


def command(name, module):
    script = os.path.join(BIN, name)
    return [script] if os.path.exists(script) else [sys.executable, "-m", module]


class Setup:
    """`servers` banyan servers (embedded store when `uri` is None) and
    their workers, in `tmp`."""

    def __init__(self, tmp, uri, servers):
        self.tmp, self.procs, self.urls = tmp, [], []
        self.http = requests.Session()
        token_file = os.path.join(tmp, "admin.token")
        for i in range(servers):
            args = command("banyan", "banyan.cli") + [
                "server",
                "--port",
                "0",
                "--data-dir",
                os.path.join(tmp, "data%d" % i),
            ]
            if uri:
                args += ["--mongo-uri", uri, "--admin-token-file", token_file]
            proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "server%d.log" % i), "wb")
            )
            line = proc.stdout.readline().decode()
            match = re.search(r"listening on (http://\S+)", line)
            if not match:
                raise SystemExit("server did not start: %r (see %s)" % (line, tmp))
            self.procs.append(proc)
            self.urls.append(match.group(1))
        if uri:
            self.token = open(token_file).read().strip()
            self.http.headers["Authorization"] = "Bearer " + self.token
        else:
            self.token = None
        self.turn = 0

    def url(self):
        self.turn += 1
        return self.urls[self.turn % len(self.urls)]

    def start_workers(self, n, cores):
        for i in range(n):
            args = command("banyan-worker", "banyan.worker") + [
                "--server",
                self.urls[i % len(self.urls)],
                "--cores",
                str(cores),
                "--host",
                "bench%d" % i,
                "--work-dir",
                os.path.join(self.tmp, "work%d" % i),
                "--log-level",
                "WARNING",
            ]
            if self.token:
                args += ["--token", self.token]
            self.procs.append(
                subprocess.Popen(
                    args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.tmp, "w%d.log" % i), "wb")
                )
            )
        deadline = time.monotonic() + 60
        while (
            len(
                self.http.get(self.urls[0] + "/workers", params={"where": json.dumps({"state": "active"})}).json()[
                    "_items"
                ]
            )
            < n
        ):
            if time.monotonic() > deadline:
                raise SystemExit("workers did not register")
            time.sleep(0.1)

    def submit(self, tasks):
        r = self.http.post(self.url() + "/tasks", json=tasks)
        if r.status_code != 201:
            raise SystemExit("submit answered %s: %s" % (r.status_code, r.text[:500]))
        body = r.json()
        return [t["_id"] for t in body["_items"]] if isinstance(tasks, list) else [body["_id"]]

    def unfinished(self):
        return self.http.get(
            self.url() + "/tasks",
            params={"max_results": 1, "where": json.dumps({"state": {"$nin": ["terminated", "cancelled"]}})},
        ).json()["_meta"]["total"]

    def close(self):
        stop_processes(reversed(self.procs))


def claims(setup, tasks, claimers):
    for start in range(0, tasks, 500):
        setup.submit([{"command": "true", "state": "available"} for _ in range(min(500, tasks - start))])
    wids = [
        setup.http.post(setup.url() + "/workers", json={"host": "c%d" % i, "resources": {"cores": 64}}).json()["_id"]
        for i in range(claimers)
    ]
    got = [0] * claimers

    def claimer(i):
        url = setup.urls[i % len(setup.urls)]
        session = requests.Session()
        session.headers.update(setup.http.headers)
        while True:
            items = session.post(
                "%s/workers/%s/claim" % (url, wids[i]),
                json={"free": {"cores": 64, "memory": 0, "gpus": 0}, "max_tasks": 64},
            ).json()
            if not items.get("_items"):
                return
            got[i] += len(items["_items"])

    seconds = timed_threads([threading.Thread(target=claimer, args=(i,)) for i in range(claimers)])
    return {"claimed": sum(got), "seconds": seconds, "per_s": sum(got) / seconds}


def w1(setup, tasks):
    setup.start_workers(2, 1)
    started = time.perf_counter()
    setup.submit([{"command": "true", "state": "available"} for _ in range(tasks)])
    while True:
        asked = time.perf_counter()
        if not setup.unfinished():
            break
        # every 50 ms, or 4 times as long as the count took: on FerretDB 1.x
        # the count reads every task (0.3 s or more at 2,000), and a count
        # every 50 ms kept one of its cores busy beside the run it measured
        time.sleep(max(0.05, 4 * (time.perf_counter() - asked)))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "per_s": tasks / seconds}


def wake(setup, samples=10):
    wid = setup.http.post(setup.urls[0] + "/workers", json={"host": "waker", "resources": {"cores": 1}}).json()["_id"]
    delays = []
    for _ in range(samples):
        task = setup.http.post(setup.urls[1] + "/tasks", json={"command": "true"}).json()["_id"]
        answered = {}

        def waiter():
            r = setup.http.post(
                "%s/workers/%s/claim" % (setup.urls[0], wid), json={"free": {"cores": 1}, "max_tasks": 1, "wait": 10}
            )
            answered["at"] = time.perf_counter()
            answered["items"] = r.json()["_items"]

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)  # the claim is waiting
        sent = time.perf_counter()
        setup.http.patch(setup.urls[1] + "/tasks/" + task, json={"state": "available"})
        thread.join()
        delays.append(answered["at"] - sent)
        setup.http.post(
            setup.urls[0] + "/tasks/%s/finish" % task, json={"attempt": 1, "outcome": "success", "exit_code": 0}
        )
    return {"median_ms": 1000 * statistics.median(delays), "max_ms": 1000 * max(delays)}


def drop_databases(uri, names):
    """Drop the databases this run made (and only those: others may be
    running their benchmarks on the same server)."""
    import pymongo

    client = pymongo.MongoClient(uri)
    for name in names:
        client.drop_database(name)
    client.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mongo-uri", help="a MongoDB-protocol server (default: start a FerretDB)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--claimers", type=int, default=4)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-servers-")
    ferret = None
    base = args.mongo_uri
    if not base:
        # its own directory (PostgreSQL runs as its own user and must reach it)
        ferret, port = tempfile.mkdtemp(prefix="bench-ferretdb-"), free_port()
        started = subprocess.run(
            ["bash", SCRIPT, "start", ferret, str(port)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHON=sys.executable),
        )
        if started.returncode:
            raise SystemExit("FerretDB did not start: %s" % started.stderr)
        base = "mongodb://127.0.0.1:%d" % port
    rows, made = [], []
    try:
        for label, uri, n in (
            ("embedded store, 1 server", None, 1),
            ("FerretDB, 1 server", base, 1),
            ("FerretDB, 3 servers", base, 3),
        ):
            row = {"setup": label}
            for name, run in (
                ("claims", lambda s: claims(s, args.tasks, args.claimers)),
                ("w1", lambda s: w1(s, args.tasks)),
                ("wake", wake if n > 1 else None),
            ):
                if run is None:
                    continue
                db_name = "bench_%s" % uuid.uuid4().hex[:10]
                db_uri = uri and "%s/%s" % (uri.rstrip("/"), db_name)
                if uri:
                    made.append(db_name)
                setup = Setup(tempfile.mkdtemp(dir=tmp), db_uri, n)
                try:
                    row[name] = run(setup)
                finally:
                    setup.close()
                print(label, name, row[name], flush=True)
            rows.append(row)
    finally:
        if ferret:
            subprocess.run(["bash", SCRIPT, "stop", ferret])
            shutil.rmtree(ferret, ignore_errors=True)
        else:
            drop_databases(base, made)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        "| set-up | batch claims, %d claimers | W1 %d x `true`, 2 workers x 1 core | wake across servers |"
        % (args.claimers, args.tasks)
    )
    print("|---|---|---|---|")
    for row in rows:
        wake_cell = (
            "median %.0f ms (max %.0f)" % (row["wake"]["median_ms"], row["wake"]["max_ms"]) if "wake" in row else "-"
        )
        print(
            "| %s | %.0f tasks/s | %.2f s, %.0f tasks/s | %s |"
            % (row["setup"], row["claims"]["per_s"], row["w1"]["seconds"], row["w1"]["per_s"], wake_cell)
        )


if __name__ == "__main__":
    main()
