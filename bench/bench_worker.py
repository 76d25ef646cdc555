"""banyan-worker end to end: a real `banyan server` (embedded store) and two
real `banyan-worker` processes of one core each, on this machine.

    /work/venv/bin/python bench/bench_worker.py [--tasks 2000] [--fanout 500] [--runs 20]

W1  --tasks tasks `true`, submitted in one POST: makespan (from the start
    of the POST to the last attempt's end, as the server recorded it) and
    tasks/s. Baseline in the same run: GNU parallel, `parallel -j2 true :::
    $(seq N)`, and the ratio of the two makespans.
W2  a fan-out and fan-in graph, 1 -> --fanout -> 1, all `true`: makespan
    from the submission of the root to the end of the sink.
W3  one `true` on idle workers, from the start of its POST to the end of its
    attempt: median (and min, max) of --runs.

Times of attempts come from the tasks' history (server clock, same machine
as the client). Figures depend on the machine and on whatever else runs on
it; this prints them, it asserts nothing.
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
from datetime import datetime, timezone

import requests
from benchkit import stop_processes

FINISHED = ["terminated", "cancelled"]


def when(date):
    return datetime.strptime(date, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


class Bench:
    def __init__(self, tmp, workers, cores, log_level):
        self.tmp = tmp
        self.http = requests.Session()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "banyan.cli", "server", "--port", "0", "--data-dir", os.path.join(tmp, "data")],
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(tmp, "server.log"), "wb"),
        )
        line = self.server.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            raise SystemExit("the server did not start: %r (see %s)" % (line, os.path.join(tmp, "server.log")))
        self.url = match.group(1)
        script = os.path.join(os.path.dirname(sys.executable), "banyan-worker")
        command = [script] if os.path.exists(script) else [sys.executable, "-m", "banyan.worker"]
        self.workers = []
        for i in range(workers):
            name = "bench-%d" % i
            self.workers.append(
                subprocess.Popen(
                    command
                    + [
                        "--server",
                        self.url,
                        "--cores",
                        str(cores),
                        "--host",
                        name,
                        "--work-dir",
                        os.path.join(tmp, "work", name),
                        "--log-level",
                        log_level,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(os.path.join(tmp, name + ".log"), "wb"),
                )
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            items = self.http.get(self.url + "/workers", params={"state": "active"}).json()["_items"]
            if len(items) == workers:
                return
            time.sleep(0.1)
        raise SystemExit("workers did not register")

    def submit(self, tasks):
        r = self.http.post(self.url + "/tasks", json=tasks)
        if r.status_code != 201:
            raise SystemExit("submit answered %s: %s" % (r.status_code, r.text[:500]))
        body = r.json()
        return [t["_id"] for t in body["_items"]] if isinstance(tasks, list) else body["_id"]

    def wait_all(self, total, interval=0.2):
        where = json.dumps({"state": {"$in": FINISHED}})
        while True:
            r = self.http.get(self.url + "/tasks", params={"where": where, "max_results": 1})
            if r.json()["_meta"]["total"] >= total:
                return
            time.sleep(interval)

    def attempts(self, where=None):
        params = {"max_results": 10000, "projection": json.dumps({"history": 1, "exit_status": 1})}
        if where:
            params["where"] = json.dumps(where)
        items = self.http.get(self.url + "/tasks", params=params).json()["_items"]
        return {t["_id"]: t for t in items}

    def close(self):
        stop_processes(self.workers)
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(timeout=30)


def check(docs, expected):
    bad = [t for t in docs.values() if t.get("exit_status") != "success" or len(t.get("history") or []) != 1]
    if len(docs) != expected or bad:
        print("  WARNING: %d tasks, %d not a single successful attempt" % (len(docs), len(bad)))


def w1(bench, n):
    t0 = time.time()
    ids = bench.submit([{"command": "true", "state": "available"} for _ in range(n)])
    submitted = time.time() - t0
    bench.wait_all(n)
    docs = bench.attempts({"_id": {"$in": ids}})
    check(docs, n)
    first = min(when(t["history"][0]["started"]) for t in docs.values())
    last = max(when(t["history"][-1]["ended"]) for t in docs.values())
    makespan = last - t0
    print(
        "W1  %d x `true`, %d workers x 1 core: makespan %.2f s (POST %.2f s, first start to last end %.2f s), "
        "%.1f tasks/s" % (n, len(bench.workers), makespan, submitted, last - first, n / makespan)
    )
    return makespan


def w2(bench, fanout):
    sink = bench.submit({"name": "sink", "command": "true"})
    middle = bench.submit([{"name": "mid-%d" % i, "command": "true", "continuations": [sink]} for i in range(fanout)])
    t0 = time.time()
    root = bench.submit({"name": "root", "command": "true", "continuations": middle, "state": "available"})
    ids = [root] + middle + [sink]
    while True:
        state = bench.http.get(bench.url + "/tasks/" + sink, params={"projection": json.dumps({"state": 1})}).json()
        if state["state"] in FINISHED:
            break
        time.sleep(0.2)
    docs = bench.attempts({"_id": {"$in": ids}})
    check(docs, len(ids))
    end = when(docs[sink]["history"][-1]["ended"])
    span = end - when(docs[root]["history"][0]["started"])
    print(
        "W2  1 -> %d -> 1 graph of `true`: makespan %.2f s from the root's POST (%.2f s root start to sink end)"
        % (fanout, end - t0, span)
    )
    return end - t0


def w3(bench, runs):
    latencies = []
    for _ in range(runs):
        t0 = time.time()
        task_id = bench.submit({"command": "true", "state": "available"})
        while True:
            doc = bench.http.get(
                bench.url + "/tasks/" + task_id, params={"projection": json.dumps({"state": 1, "history": 1})}
            ).json()
            if doc["state"] in FINISHED:
                break
            time.sleep(0.005)
        latencies.append(when(doc["history"][-1]["ended"]) - t0)
        time.sleep(0.3)  # idle again: the workers are back in their long polls
    print(
        "W3  one `true` on idle workers, POST to end of attempt: median %.1f ms (min %.1f, max %.1f, %d runs)"
        % (1000 * statistics.median(latencies), 1000 * min(latencies), 1000 * max(latencies), runs)
    )
    return statistics.median(latencies)


def gnu_parallel(n):
    exe = shutil.which("parallel")
    if exe is None:
        print("GNU parallel: NOT INSTALLED (apt-get install -y parallel): no baseline, no ratio")
        return None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.splitlines()
    if not version or "GNU parallel" not in version[0]:
        print("GNU parallel: %s is not GNU parallel (%r): no baseline" % (exe, version[:1]))
        return None
    args = [exe, "--will-cite", "-j2", "true", ":::"] + [str(i) for i in range(1, n + 1)]
    t0 = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.time() - t0
    print("GNU parallel -j2 true ::: $(seq %d): %.2f s, %.1f tasks/s (%s)" % (n, elapsed, n / elapsed, version[0]))
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--fanout", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log-level", default="WARNING", help="of the workers (default WARNING)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()

    print("machine: %d CPUs, load average %s" % (os.cpu_count(), " ".join("%.2f" % x for x in os.getloadavg())))
    baseline = gnu_parallel(args.tasks)
    tmp = tempfile.mkdtemp(prefix="bench-worker-")
    bench = Bench(tmp, args.workers, 1, args.log_level)
    try:
        makespan = w1(bench, args.tasks)
        if baseline:
            print(
                "W1 / GNU parallel: %.1fx the makespan (Banyan %.2f s, parallel %.2f s)"
                % (makespan / baseline, makespan, baseline)
            )
        w2(bench, args.fanout)
        w3(bench, args.runs)
    finally:
        bench.close()
        if args.keep:
            print("logs in", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
