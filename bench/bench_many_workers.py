"""Many workers on one server: what idle workers cost it, and how fast it
hands out tasks to many of them.

    .venv/bin/python bench/bench_many_workers.py [--idle 500] [--seconds 30]
        [--throughput 50 300] [--tasks 3000] [--mongo-uri URI]

A real `banyan server` (embedded store in a temporary directory, or
`--mongo-uri`), and simulated workers (tests/simulated_workers.py: light
clients speaking the worker protocol, one thread each, in this process):

1. idle: `--idle` workers long-polling an empty queue (claim wait 20 s and a
   heartbeat every 10 s, banyan-worker's defaults). After a warm-up, over
   `--seconds`: the server's CPU (% of one core), RSS, threads and open
   connections, the claims it answered per second (and how many were turned
   away with a `retry_after`), and a user's `GET /tasks/<id>` (a new
   connection each time, from another process) p50/p99/max.
2. throughput: for each count in `--throughput`, a fresh server holding
   `--tasks` ready tasks, then that many workers claim them one at a time,
   reporting each with their next claim (as banyan-worker does): tasks
   claimed and reported per second, and the user's GET p99 meanwhile.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from simulated_workers import Fleet, LatencyProbe, percentile  # noqa: E402


class Server:
    def __init__(self, tmp, mongo_uri=None):
        self.tmp = tmp
        args = [sys.executable, "-m", "banyan.cli", "server", "--port", "0", "--data-dir", os.path.join(tmp, "data")]
        if mongo_uri:
            args += ["--mongo-uri", mongo_uri]
        self.log = open(os.path.join(tmp, "server.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode()
        self.url = re.search(r"listening on (http://\S+)", line).group(1)
        self.ps = psutil.Process(self.proc.pid)

    def sample(self):
        cpu = self.ps.cpu_times()
        try:
            connections = len([c for c in self.ps.net_connections(kind="tcp") if c.status == "ESTABLISHED"])
        except (psutil.AccessDenied, AttributeError):
            connections = self.ps.num_fds()
        return {
            "cpu": cpu.user + cpu.system,
            "rss": self.ps.memory_info().rss,
            "threads": self.ps.num_threads(),
            "connections": connections,
            "time": time.monotonic(),
        }

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def submit(url, count, chunk=500):
    ids = []
    with requests.Session() as http:
        for start in range(0, count, chunk):
            body = [
                {"command": "true", "state": "available", "name": "b%d" % i}
                for i in range(start, min(count, start + chunk))
            ]
            r = http.post(url + "/tasks", json=body, timeout=600)
            r.raise_for_status()
            ids += [item["_id"] for item in r.json()["_items"]]
    return ids


def left(url):
    r = requests.get(
        url + "/tasks",
        params={"where": '{"state": {"$nin": ["terminated", "cancelled"]}}', "max_results": 1},
        timeout=60,
    )
    return r.json()["_meta"]["total"]


def ms(seconds):
    return "%.1f" % (seconds * 1000) if seconds is not None else "-"


def idle(args):
    tmp = tempfile.mkdtemp(prefix="bench-many-")
    server = Server(tmp, args.mongo_uri)
    fleet = None
    try:
        task_id = requests.post(server.url + "/tasks", json={"command": "true"}).json()["_id"]
        fleet = Fleet(server.url, args.idle, claim_wait=20, heartbeat=10).start()
        time.sleep(args.warmup)
        claims_before = sum(w.claims for w in fleet.workers)
        away_before = sum(w.turned_away for w in fleet.workers)
        probe = LatencyProbe(server.url, task_id, os.path.join(tmp, "latencies")).start()
        before = server.sample()
        peak = dict(before)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(1)
            now = server.sample()
            for key in ("rss", "threads", "connections"):
                peak[key] = max(peak[key], now[key])
        after = server.sample()
        probe.stop()
        wall = after["time"] - before["time"]
        claims = sum(w.claims for w in fleet.workers) - claims_before
        away = sum(w.turned_away for w in fleet.workers) - away_before
        errors = fleet.errors
        print(
            "idle: %d simulated workers long-polling, %.0f s measured after %.0f s warm-up"
            % (args.idle, wall, args.warmup)
        )
        print(
            "  server CPU %.1f%% of a core, RSS %.0f MiB (peak %.0f), threads %d (peak %d), "
            "connections %d (peak %d)"
            % (
                100 * (after["cpu"] - before["cpu"]) / wall,
                after["rss"] / 2**20,
                peak["rss"] / 2**20,
                after["threads"],
                peak["threads"],
                after["connections"],
                peak["connections"],
            )
        )
        print(
            "  claims answered %.1f/s (%.1f/s turned away with retry_after); worker errors: %d"
            % (claims / wall, away / wall, len(errors))
        )
        print(
            "  user GET /tasks/<id>: %d reads, p50 %s ms, p99 %s ms (goal: under 200 ms), max %s ms, statuses %s"
            % (
                len(probe.seconds),
                ms(percentile(probe.seconds, 0.5)),
                ms(probe.p99()),
                ms(max(probe.seconds) if probe.seconds else None),
                sorted(set(map(str, probe.statuses))),
            )
        )
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def throughput(args, count):
    tmp = tempfile.mkdtemp(prefix="bench-many-")
    server = Server(tmp, args.mongo_uri)
    fleet = None
    try:
        task_id = requests.post(server.url + "/tasks", json={"command": "true", "name": "watched"}).json()["_id"]
        submit(server.url, args.tasks)
        fleet = Fleet(server.url, count, claim_wait=5, heartbeat=10)
        for worker in fleet.workers:
            worker.register()
        probe = LatencyProbe(server.url, task_id, os.path.join(tmp, "latencies")).start()
        before = server.sample()
        started = time.monotonic()
        for worker in fleet.workers:
            worker.start()
        while left(server.url) > 1:  # the watched task stays inactive
            time.sleep(0.2)
        seconds = time.monotonic() - started
        after = server.sample()
        probe.stop()
        done = len(fleet.runs)
        print(
            "throughput: %d simulated workers, %d tasks: %.0f tasks claimed and reported per second "
            "(%.1f s); server CPU %.0f%% of a core, %d connections; user GET p99 %s ms (goal: under 200 ms; "
            "max %s ms, %d reads); "
            "worker errors: %d"
            % (
                count,
                done,
                done / seconds,
                seconds,
                100 * (after["cpu"] - before["cpu"]) / seconds,
                after["connections"],
                ms(probe.p99()),
                ms(max(probe.seconds) if probe.seconds else None),
                len(probe.seconds),
                len(fleet.errors),
            )
        )
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument("--throughput", type=int, nargs="*", default=[50, 300])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--mongo-uri", default=None)
    args = parser.parse_args()
    if args.idle:
        idle(args)
    for count in args.throughput:
        throughput(args, count)


if __name__ == "__main__":
    main()
