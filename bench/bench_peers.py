"""Banyan beside its peers on W1, W2 and W3, in one invocation, with ratios.

    .venv/bin/python bench/bench_peers.py [--repeats 3] [--mongo-uri mongodb://127.0.0.1:27017]
                                          [--peers-dir ../shared/peers] [--skip-peers]
                                          [--also-worker-args "--prefetch 0"]

The workloads and the timing are those of the shared peer harness
(`../shared/peers`, README.md there), so the figures compare:

W1  2,000 independent `true` tasks, 1 core each, 2 slots: makespan from the
    start of the submission to the client seeing all finished; tasks/s.
W2  a graph 1 -> 500 -> 1 of `true`: makespan to the sink finished.
W3  one `true` on idle workers, submission to the client seeing it
    finished; the median of 20 in a row.

Banyan runs here: per repetition a fresh `banyan server` (embedded store in
a fresh directory, or with --mongo-uri a fresh database on that MongoDB or
FerretDB, beside the embedded run), one `banyan-worker` of 2 cores with
its defaults (`--prefetch auto` among them: W1 and W2 prefetch; W3's
one task at a time leaves nothing to prefetch), a warm-up and 1 s idle; completion is what `banyan.Client.wait` (what
`banyan wait` and `submit --wait` use) reports, as users get it. Then each
peer the harness knows is run with its own runner (the same environment
variables: BENCH_N_W1, BENCH_N_W2, BENCH_N_W3, BENCH_REPEATS); a peer that
is not installed is skipped, and said so (`bash ../shared/peers/setup_peers.sh`
installs them). Prints one table of medians [min-max] and the ratios of
Banyan (embedded store) to each peer. Asserts nothing; run it with nothing
else busy on the machine, and compare ratios within one run only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import banyan

BIN = os.path.dirname(sys.executable)
SLOTS = 2
N_W1 = int(os.environ.get("BENCH_N_W1", "2000"))
N_W2 = int(os.environ.get("BENCH_N_W2", "500"))
N_W3 = int(os.environ.get("BENCH_N_W3", "20"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (interpreter, runner, what must exist), as side_by_side.sh runs them.
PEERS = {
    "task-spooler": ("python3", "run_tsp.py", lambda: shutil.which("tsp") or shutil.which("ts")),
    "hyperqueue": ("/tmp/venv-hq/bin/python", "run_hyperqueue.py", lambda: os.path.exists("/tmp/venv-hq/bin/python")),
    "celery": ("/tmp/venv-celery/bin/python", "run_celery.py", lambda: os.path.exists("/tmp/venv-celery/bin/python")),
    "gnu-parallel": ("python3", "run_parallel.py", lambda: shutil.which("parallel")),
    "rq": ("/tmp/venv-rq/bin/python", "run_rq.py", lambda: os.path.exists("/tmp/venv-rq/bin/python")),
}


class Cluster:
    """A fresh server and one worker of SLOTS cores (with ``worker_args`` added)."""

    def __init__(self, mongo_uri=None, worker_args=()):
        self.tmp = tempfile.mkdtemp(prefix="bench-peers-")
        self.mongo_uri = None
        args = [os.path.join(BIN, "banyan"), "server", "--port", "0", "--data-dir", os.path.join(self.tmp, "data")]
        if mongo_uri:
            base, _, query = mongo_uri.partition("?")
            self.mongo_uri = "%s/bench_%s%s" % (base.rstrip("/"), uuid.uuid4().hex[:12], "?" + query if query else "")
            args += ["--mongo-uri", self.mongo_uri]
        log = open(os.path.join(self.tmp, "server.log"), "wb")
        self.server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        match = re.search(r"(http://\S+)", self.server.stdout.readline().decode())
        if not match:
            raise SystemExit("banyan server did not start; see %s/server.log" % self.tmp)
        self.url = match.group(1)
        token, worker_token = None, None
        if mongo_uri:  # MongoDB means authentication: the first start wrote an admin token
            token = open(os.path.join(self.tmp, "data", "admin.token")).read().strip()
            with banyan.Client(self.url, token) as admin:
                worker_token = admin.request(
                    "POST", ("tokens",), json_body={"role": "worker", "name": "bench"}, idempotent=False
                )["token"]
        self.client = banyan.Client(self.url, token)
        env = dict(os.environ, BANYAN_TOKEN=worker_token) if worker_token else None
        self.worker = subprocess.Popen(
            [
                os.path.join(BIN, "banyan-worker"),
                "--server",
                self.url,
                "--cores",
                str(SLOTS),
                "--work-dir",
                os.path.join(self.tmp, "work"),
                "--log-level",
                "WARNING",
            ]
            + list(worker_args),
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.tmp, "worker.log"), "wb"),
            start_new_session=True,
            env=env,
        )
        deadline = time.monotonic() + 60
        while not self.client.list_workers(state="active")["_items"]:
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not register; see %s/worker.log" % self.tmp)
            time.sleep(0.1)
        self.wait(self.submit([{"command": "true", "state": "available"} for _ in range(4)]))
        time.sleep(1.0)

    def submit(self, docs):
        return self.client.create_tasks(docs if isinstance(docs, list) else [docs])

    def wait(self, ids):
        result = self.client.wait(ids)
        if not result.ok:
            raise SystemExit("tasks did not succeed: %s" % result.failed[:3])

    def close(self):
        for proc in (self.worker, self.server):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.client.close()
        if self.mongo_uri:
            import pymongo

            with pymongo.MongoClient(self.mongo_uri) as mongo:
                mongo.drop_database(mongo.get_default_database().name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def one(workload, mongo_uri, worker_args=()):
    cluster = Cluster(mongo_uri, worker_args)
    try:
        if workload == "W1":
            start = time.perf_counter()
            cluster.wait(cluster.submit([{"command": "true", "state": "available"} for _ in range(N_W1)]))
            return time.perf_counter() - start
        if workload == "W2":
            start = time.perf_counter()
            sink = cluster.submit({"command": "true"})
            middle = cluster.submit([{"command": "true", "continuations": sink} for _ in range(N_W2)])
            cluster.submit({"command": "true", "continuations": middle, "state": "available"})
            cluster.wait(sink)
            return time.perf_counter() - start
        latencies = []
        for _ in range(N_W3):
            start = time.perf_counter()
            cluster.wait(cluster.submit({"command": "true", "state": "available"}))
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
        return statistics.median(latencies)
    finally:
        cluster.close()


def summary(values):
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def run_banyan(repeats, mongo_uri=None, worker_args=()):
    runs = {wl: [one(wl, mongo_uri, worker_args) for _ in range(repeats)] for wl in ("W1", "W2", "W3")}
    return {
        "W1_tasks_per_s": summary(N_W1 / s for s in runs["W1"]),
        "W2_makespan_s": summary(runs["W2"]),
        "W3_latency_median_s": summary(runs["W3"]),
    }


def run_peer(name, peers_dir, results_dir, repeats):
    python, runner, installed = PEERS[name]
    if not installed():
        print("%s: not installed, skipped (bash %s/setup_peers.sh)" % (name, peers_dir), flush=True)
        return None
    env = dict(
        os.environ,
        PEERS_RESULTS=results_dir,
        BENCH_REPEATS=str(repeats),
        BENCH_N_W1=str(N_W1),
        BENCH_N_W2=str(N_W2),
        BENCH_N_W3=str(N_W3),
    )
    with open(os.path.join(results_dir, name + ".log"), "wb") as log:
        code = subprocess.run(
            [python, runner], cwd=peers_dir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3600
        ).returncode
    path = os.path.join(results_dir, name + ".json")
    if code != 0 or not os.path.exists(path):
        print("%s: its runner failed (exit code %s), skipped; see %s.log" % (name, code, name), flush=True)
        return None
    with open(path) as fh:
        return json.load(fh)["results"]["summary"]


def cell(s, key, fmt, scale=1.0):
    v = s.get(key) if s else None
    if not v:
        return "—"
    return "%s [%s–%s]" % tuple(fmt.format(v[k] * scale) for k in ("median", "min", "max"))


def ratio(ours, theirs, key, better_high):
    if not theirs or not theirs.get(key) or not ours.get(key):
        return "—"
    value = ours[key]["median"] / theirs[key]["median"]
    return "%.2fx%s" % (value, "" if (value >= 1) == better_high else " (behind)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=int(os.environ.get("BENCH_REPEATS", "3")))
    parser.add_argument(
        "--mongo-uri",
        default=os.environ.get("BANYAN_BENCH_MONGO_URI"),
        help="also run Banyan on this MongoDB/FerretDB (a fresh database each time)",
    )
    parser.add_argument(
        "--peers-dir",
        default=os.environ.get("BANYAN_PEERS_DIR"),
        help="the shared peer harness (default: ../shared/peers from the repository, or from its parent)",
    )
    parser.add_argument("--skip-peers", action="store_true", help="Banyan only")
    parser.add_argument(
        "--also-worker-args",
        action="append",
        default=[],
        metavar="ARGS",
        help="Banyan again (embedded store) with these banyan-worker options, as a row "
        'of its own (e.g. "--prefetch 0"); may be repeated',
    )
    args = parser.parse_args()
    peers_dir = args.peers_dir or next(
        (
            d
            for d in (os.path.join(REPO, "..", "shared", "peers"), os.path.join(REPO, "..", "..", "shared", "peers"))
            if os.path.isdir(d)
        ),
        None,
    )
    results_dir = tempfile.mkdtemp(prefix="bench-peers-results-")
    rows = {}
    print("banyan (embedded store) ...", flush=True)
    rows["banyan"] = run_banyan(args.repeats)
    for extra in args.also_worker_args:
        print("banyan (banyan-worker %s) ..." % extra, flush=True)
        rows["banyan, worker %s" % extra] = run_banyan(args.repeats, worker_args=extra.split())
    if args.mongo_uri:
        print("banyan (%s) ..." % args.mongo_uri, flush=True)
        rows["banyan on MongoDB/FerretDB"] = run_banyan(args.repeats, args.mongo_uri)
    if not args.skip_peers:
        if peers_dir is None:
            print("no peer harness found (give --peers-dir): peers skipped")
        else:
            for name in PEERS:
                print("%s ..." % name, flush=True)
                rows[name] = run_peer(name, os.path.abspath(peers_dir), results_dir, args.repeats)
    ours = rows["banyan"]
    print()
    print(
        "N_W1=%d N_W2=%d N_W3=%d, %d repetition(s), medians [min-max]; ratios: Banyan (embedded) / peer"
        % (N_W1, N_W2, N_W3, args.repeats)
    )
    print()
    print(
        "| | W1 tasks/s | W2 makespan s | W3 latency ms | W1 ratio (higher is better) "
        "| W2 ratio (lower is better) | W3 ratio (lower is better) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        if s is None:
            continue
        print(
            "| %s | %s | %s | %s | %s | %s | %s |"
            % (
                name,
                cell(s, "W1_tasks_per_s", "{:.0f}"),
                cell(s, "W2_makespan_s", "{:.2f}"),
                cell(s, "W3_latency_median_s", "{:.1f}", 1000),
                ratio(ours, s, "W1_tasks_per_s", True) if name != "banyan" else "",
                ratio(ours, s, "W2_makespan_s", False) if name != "banyan" else "",
                ratio(ours, s, "W3_latency_median_s", False) if name != "banyan" else "",
            )
        )
    shutil.rmtree(results_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
