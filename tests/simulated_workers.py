"""Simulated workers: many light clients that speak the worker protocol
(docs/API.md: register, long-polling claims, heartbeats, finish) from one
process, one thread each, without running anything.

A simulated worker "runs" a task by waiting `run_seconds` and reports the
outcome `outcome_of(task)` chooses (default: success, exit code 0) with its
next claim, as banyan-worker does. It
records every attempt it was given (`SimulatedWorker.runs`), so a test can
check that no task was handed out twice and that each was recorded as it
was reported. It honours the server's `retry_after`, as `banyan-worker` does,
and sends a heartbeat every `heartbeat` seconds (between claims: a claim
waits at most `claim_wait` seconds).

Used by tests/test_many_workers.py and bench/bench_many_workers.py.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import requests
from requests.adapters import HTTPAdapter


def succeed(task):
    return "success", 0


class Run:
    """One attempt a simulated worker was given."""

    __slots__ = ("task_id", "attempt", "worker", "claimed", "reported", "outcome", "exit_code", "status")

    def __init__(self, task_id, attempt, worker, claimed):
        self.task_id, self.attempt, self.worker, self.claimed = task_id, attempt, worker, claimed
        self.reported = self.outcome = self.exit_code = self.status = None


class SimulatedWorker:
    def __init__(
        self,
        url,
        host,
        token=None,
        cores=1,
        claim_wait=5.0,
        heartbeat=5.0,
        run_seconds=0.0,
        outcome_of=succeed,
        timeout=60.0,
    ):
        self.url = url.rstrip("/")
        self.host = host
        self.cores = cores
        self.claim_wait = claim_wait
        self.heartbeat_interval = heartbeat
        self.run_seconds = run_seconds
        self.outcome_of = outcome_of
        self.timeout = timeout
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=1))
        if token:
            self.session.headers["Authorization"] = "Bearer " + token
        self.wid = None
        self.runs = []
        self.errors = []  # (what, status or exception text)
        self.claims = self.turned_away = 0
        self.stop_event = threading.Event()
        self.thread = None
        self._last_heartbeat = 0.0

    def _post(self, path, body, timeout=None):
        return self.session.post(self.url + path, json=body, timeout=timeout or self.timeout)

    def register(self):
        r = self._post(
            "/workers", {"host": self.host, "resources": {"cores": self.cores, "memory": 1 << 30, "gpus": 0}}
        )
        r.raise_for_status()
        self.wid = r.json()["_id"]
        return self.wid

    def heartbeat(self, held=()):
        tasks = {run.task_id: {"attempt": run.attempt} for run in held}
        r = self._post("/workers/%s/heartbeat" % self.wid, {"tasks": tasks})
        self._last_heartbeat = time.monotonic()
        if r.status_code != 200:
            self.errors.append(("heartbeat", r.status_code))
        return r

    def claim(self, finished=()):
        """One claim, carrying the reports of `finished` runs first (as
        banyan-worker sends them); returns (tasks, retry_after or None)."""
        body = {
            "free": {"cores": self.cores, "memory": 1 << 30, "gpus": 0},
            "max_tasks": self.cores,
            "wait": 0 if finished else self.claim_wait,
        }
        if finished:
            body["finished"] = [
                {
                    "task": run.task_id,
                    "attempt": run.attempt,
                    "outcome": run.outcome,
                    "exit_code": run.exit_code,
                    "stdout": "simulated by %s\n" % self.host,
                }
                for run in finished
            ]
        r = self._post("/workers/%s/claim" % self.wid, body, timeout=self.timeout + self.claim_wait)
        self.claims += 1
        if r.status_code != 200:
            self.errors.append(("claim", r.status_code))
            for run in finished:
                run.status = r.status_code
            return [], 1.0
        reply = r.json()
        for run, result in zip(finished, reply.get("finished") or []):
            run.status, run.reported = (
                (200 if result.get("_status") == "OK" else result["_error"]["code"]),
                time.monotonic(),
            )
            if run.status != 200:
                self.errors.append(("finish", run.status))
        return reply["_items"], reply.get("retry_after")

    def finish(self, run):
        outcome, exit_code = run.outcome, run.exit_code
        r = self._post(
            "/tasks/%s/finish" % run.task_id,
            {
                "attempt": run.attempt,
                "outcome": outcome,
                "exit_code": exit_code,
                "stdout": "simulated by %s\n" % self.host,
            },
        )
        run.status, run.reported = r.status_code, time.monotonic()
        if r.status_code != 200:
            self.errors.append(("finish", r.status_code))

    def run(self):
        """Claim, "run", report, until stopped; heartbeats in between."""
        try:
            if self.wid is None:
                self.register()
            self.heartbeat()
            ended = []
            while not self.stop_event.is_set():
                if time.monotonic() - self._last_heartbeat >= self.heartbeat_interval:
                    self.heartbeat(ended)
                items, retry_after = self.claim(ended)
                ended = []
                for task in items:
                    run = Run(task["_id"], task["history"][-1]["attempt"], self.wid, time.monotonic())
                    run.outcome, run.exit_code = self.outcome_of(task)
                    self.runs.append(run)
                    ended.append(run)
                if ended:
                    if self.run_seconds:
                        self.stop_event.wait(self.run_seconds)
                elif retry_after:
                    self.turned_away += 1
                    self.stop_event.wait(retry_after)
            for run in ended:  # stopped with reports in hand: deliver them alone
                self.finish(run)
        except Exception as exc:  # recorded for the test to fail on
            self.errors.append(("crash", repr(exc)))

    def start(self):
        self.thread = threading.Thread(target=self.run, name="sim-%s" % self.host, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stop_event.set()

    def join(self, timeout=None):
        if self.thread is not None:
            self.thread.join(timeout)
        try:
            if self.wid is not None:
                self.session.delete(self.url + "/workers/%s" % self.wid, timeout=self.timeout)
        finally:
            self.session.close()


class Fleet:
    """`count` simulated workers against one server, started together."""

    def __init__(self, url, count, token=None, prefix="sim", **options):
        self.workers = [SimulatedWorker(url, "%s%d" % (prefix, i), token=token, **options) for i in range(count)]

    def start(self, register_threads=16):
        # register in parallel (a few threads), then start the loops
        chunks = [self.workers[i::register_threads] for i in range(register_threads)]
        threads = [threading.Thread(target=lambda c=c: [w.register() for w in c]) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for worker in self.workers:
            worker.start()
        return self

    def stop(self, timeout=60):
        for worker in self.workers:
            worker.stop()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.join(max(0.1, deadline - time.monotonic()))

    @property
    def runs(self):
        return [run for worker in self.workers for run in worker.runs]

    @property
    def errors(self):
        return [(worker.host,) + error for worker in self.workers for error in worker.errors]

    @property
    def ids(self):
        return {worker.wid for worker in self.workers}


def percentile(values, fraction):
    """The `fraction` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))]


class LatencyProbe:
    """A user reading one task (`GET /tasks/<id>`) every `interval` seconds,
    timing each answer (a new connection each time: the server must also
    accept promptly). It runs in a process of its own, so that the threads
    of simulated workers do not delay it in this one."""

    def __init__(self, url, task_id, out_path, token=None, interval=0.05):
        self.args = [
            sys.executable,
            os.path.abspath(__file__),
            "probe",
            "%s/tasks/%s" % (url.rstrip("/"), task_id),
            str(out_path),
            str(interval),
        ]
        self.env = dict(os.environ, PROBE_TOKEN=token or "")
        self.out_path = str(out_path)
        self.proc = None
        self.seconds, self.statuses = [], []

    def start(self):
        self.proc = subprocess.Popen(self.args, env=self.env)
        return self

    def stop(self):
        """Stop it and read its figures."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.seconds, self.statuses = [], []
        if os.path.exists(self.out_path):
            with open(self.out_path) as f:
                for line in f:
                    seconds, status = line.split(None, 1)
                    self.seconds.append(float(seconds))
                    self.statuses.append(int(status) if status.strip().isdigit() else status.strip())
        return self

    def p99(self):
        return percentile(self.seconds, 0.99)


def _probe(url, out_path, interval):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    session = requests.Session()
    session.headers["Connection"] = "close"
    if os.environ.get("PROBE_TOKEN"):
        session.headers["Authorization"] = "Bearer " + os.environ["PROBE_TOKEN"]
    with open(out_path, "a") as out:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = session.get(url, timeout=30).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            out.write("%.6f %s\n" % (time.perf_counter() - started, status))
            out.flush()
            stop.wait(interval)


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        _probe(sys.argv[2], sys.argv[3], float(sys.argv[4]))
