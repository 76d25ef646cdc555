"""The worker loop against a small in-memory fake of the HTTP contract (docs/API.md).

Real worker (a thread, or a process for signals), real tasks, real HTTP.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import conftest
import pytest

from banyan.worker import resources
from banyan.worker.worker import Worker, WorkerConfig


class FakeBanyan:
    """Just enough of the server: workers, batch claims, heartbeats, finish."""

    def __init__(self, port=0):
        self.lock = threading.Condition()
        self.tasks = {}  # id -> task document
        self.order = []
        self.workers = {}  # id -> {"state", "resources", "heartbeats"}
        self.finished = []  # finish bodies, with "task_id"
        self.claims = []  # claim bodies
        self.requests = []  # (method, path)
        self.lost_workers = set()
        self.failure = None  # "500" or "reset": how every request fails while set
        self.fail_next = 0  # fail this many more requests (as "500" unless failure says otherwise)
        self.failed = 0  # requests failed so far
        self.finish_down = False  # answer every report with 503 while set
        self.refused_reports = 0  # requests with reports answered 503 so far
        self.retry_after = None  # seconds sent with an empty claim answer (the server's waiters are full)
        self.claim_times = []  # monotonic time of each claim
        self.registration_gate = None  # an Event: while set here, registrations are answered once it is set
        self._start(port)

    # -- test helpers --
    def _start(self, port):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                fake.dispatch(self, "POST")

            def do_DELETE(self):
                fake.dispatch(self, "DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def restart(self):
        self._start(self.port)

    def submit(self, task_id, command, **fields):
        with self.lock:
            task = {
                "_id": task_id,
                "command": command,
                "state": "available",
                "history": [],
                "requested_resources": {"cores": 1, "memory": 0, "gpus": 0},
                "max_shutdown_time": 10,
            }
            task.update(fields)
            self.tasks[task_id] = task
            self.order.append(task_id)
            self.lock.notify_all()

    def cancel(self, task_id):
        with self.lock:
            task = self.tasks[task_id]
            assert task["state"] == "running"
            task["state"] = "pending_cancellation"

    def finish_of(self, task_id):
        with self.lock:
            return next((f for f in self.finished if f["task_id"] == task_id), None)

    # -- the contract --
    def dispatch(self, handler, method):
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"null")
        path = handler.path.split("?")[0]
        with self.lock:
            self.requests.append((method, path))
            mode = self.failure or ("500" if self.fail_next > 0 else None)
            self.fail_next = max(0, self.fail_next - 1)
            self.failed += mode is not None
        if mode == "reset":  # drop the connection without an answer
            handler.close_connection = True
            return
        if mode == "500":  # a crashed server's HTML page, not JSON
            page = b"<html><body>Internal Server Error</body></html>"
            handler.send_response(500)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(page)))
            handler.end_headers()
            handler.wfile.write(page)
            return
        status, reply = self.route(method, path, body)
        data = json.dumps(reply).encode() if reply is not None else b""
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def error(code, message):
        return code, {"_status": "ERR", "_error": {"code": code, "message": message}}

    def route(self, method, path, body):
        if method == "POST" and path == "/workers":
            if self.registration_gate is not None:
                assert self.registration_gate.wait(30), "the test never let the registration through"
            with self.lock:
                wid = f"w{len(self.workers) + 1}"
                self.workers[wid] = {
                    "state": "active",
                    "resources": body["resources"],
                    "host": body["host"],
                    "heartbeats": [],
                }
            return 201, {"_id": wid, "_status": "OK"}
        m = re.fullmatch(r"/workers/([^/]+)(/claim|/heartbeat)?", path)
        if m:
            wid, action = m.groups()
            if wid not in self.workers or self.workers[wid]["state"] != "active":
                return self.error(404, f"no active worker {wid}")
            if method == "DELETE" and action is None:
                with self.lock:
                    self.workers[wid]["state"] = "stopped"
                return 204, None
            if action == "/claim":
                if self.finish_down and body.get("finished"):
                    self.refused_reports += 1
                    return self.error(503, "finish is down")  # as the server: a 5xx fails them all
                return 200, self.claim(wid, body)
            if action == "/heartbeat":
                return self.heartbeat(wid, body)
        m = re.fullmatch(r"/tasks/([^/]+)/finish", path)
        if m and method == "POST":
            return self.finish(m.group(1), body)
        return self.error(404, f"no route {method} {path}")

    def claim(self, wid, body):
        # reports of ended attempts come first, each answered as /finish would
        finished = []
        for report in body.get("finished") or []:
            status, reply = self.finish(report["task"], {k: v for k, v in report.items() if k != "task"})
            finished.append(
                {"_id": report["task"], "_status": "OK"} if status == 200 else dict(reply, _id=report["task"])
            )
        deadline = time.monotonic() + min(float(body.get("wait") or 0), 5)
        with self.lock:
            self.claims.append(body)
            self.claim_times.append(time.monotonic())
            if self.retry_after is not None and not any(t["state"] == "available" for t in self.tasks.values()):
                return {"_items": [], "cancel": [], "retry_after": self.retry_after}
            while True:
                free = dict(body["free"])
                items = []
                if self.workers[wid]["state"] != "active":
                    break  # marked lost during the long poll: claim nothing for it
                for task_id in self.order:
                    task = self.tasks[task_id]
                    need = task["requested_resources"]
                    if task["state"] != "available" or len(items) >= body["max_tasks"]:
                        continue
                    if any(need[k] > free[k] for k in ("cores", "memory", "gpus")):
                        continue
                    for k in free:
                        free[k] -= need[k]
                    task["state"] = "running"
                    task["worker"] = wid
                    task["history"].append({"attempt": len(task["history"]) + 1, "worker": wid})
                    items.append(json.loads(json.dumps(task)))
                remaining = deadline - time.monotonic()
                if items or remaining <= 0:
                    break
                self.lock.wait(min(remaining, 0.1))
            cancel = [
                t["_id"] for t in self.tasks.values() if t.get("worker") == wid and t["state"] == "pending_cancellation"
            ]
        reply = {"_items": items, "cancel": cancel}
        if body.get("finished"):
            reply["finished"] = finished
        return reply

    def heartbeat(self, wid, body):
        with self.lock:
            self.workers[wid]["heartbeats"].append(body)
            held = {
                t["_id"]
                for t in self.tasks.values()
                if t.get("worker") == wid and t["state"] in ("running", "pending_cancellation")
            }
            cancel = [t for t in held if self.tasks[t]["state"] == "pending_cancellation"]
            unknown = [t for t in body["tasks"] if t not in held]
        return 200, {"cancel": cancel, "unknown": unknown}

    def finish(self, task_id, body):
        with self.lock:
            if self.finish_down:
                self.refused_reports += 1
                return self.error(503, "finish is down")
            task = self.tasks.get(task_id)
            if task is None:
                return self.error(404, f"no task {task_id}")
            if task["state"] not in ("running", "pending_cancellation") or body["attempt"] != len(task["history"]):
                return self.error(409, f"task {task_id} attempt {body['attempt']} is not current")
            task["state"] = "cancelled" if body["outcome"] == "cancelled" else "terminated"
            task["exit_status"] = body["outcome"]
            task.pop("worker", None)
            self.finished.append(dict(body, task_id=task_id))
            self.lock.notify_all()
        return 200, {"_id": task_id, "state": task["state"]}


def wait_for(predicate, timeout=8.0, what="condition"):
    """conftest's wait_for, polling more often: the fake server answers at once."""
    return conftest.wait_for(predicate, timeout, what, interval=0.02)


@pytest.fixture
def fake():
    server = FakeBanyan()
    yield server
    server.stop()


class RunningWorker:
    def __init__(self, config):
        self.worker = Worker(config)
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.result = self.worker.run()

    def stop(self, timeout=8.0):
        self.worker.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        return self.result


@pytest.fixture
def start_worker(fake, tmp_path):
    running = []

    def start(**overrides):
        settings = dict(
            server=fake.url,
            cores=2,
            memory="1 GiB",
            gpus=0,
            heartbeat=0.2,
            timeout=1.5,
            drain=5,
            claim_wait=1,
            work_dir=str(tmp_path / "work"),
            host="testhost",
        )
        settings.update(overrides)
        runner = RunningWorker(WorkerConfig(**settings))
        running.append(runner)
        return runner

    yield start
    for runner in running:
        if runner.thread.is_alive():
            runner.worker.request_force_stop()
            runner.thread.join(5)


def test_claims_runs_and_reports_output(fake, start_worker):
    fake.submit("ok", "echo out; echo err >&2; echo '0.5 half' >> \"$BANYAN_PROGRESS_FILE\"")
    fake.submit("bad", ["sh", "-c", "echo nope; exit 3"])
    fake.submit("big", "echo never", requested_resources={"cores": 4, "memory": 0, "gpus": 0})
    runner = start_worker()
    wait_for(lambda: fake.finish_of("ok") and fake.finish_of("bad"), what="two reports")
    ok, bad = fake.finish_of("ok"), fake.finish_of("bad")
    assert (ok["attempt"], ok["outcome"], ok["exit_code"]) == (1, "success", 0)
    assert (ok["stdout"], ok["stderr"]) == ("out\n", "err\n")
    assert set(ok["usage"]) == {"max_rss", "cpu_percent"}
    assert (bad["outcome"], bad["exit_code"], bad["stdout"]) == ("failure", 3, "nope\n")
    # Registration carried the configured totals; claims never offered more than them.
    assert fake.workers["w1"]["resources"] == {"cores": 2.0, "memory": 1024**3, "gpus": 0}
    assert fake.workers["w1"]["host"] == "testhost"
    assert all(c["free"]["cores"] <= 2 and c["free"]["memory"] <= 1024**3 for c in fake.claims)
    assert fake.tasks["big"]["state"] == "available"  # 4 cores never fit on 2
    assert runner.stop() == 0
    assert fake.workers["w1"]["state"] == "stopped"  # unregistered
    work_dir = runner.worker.config.work_dir
    # attempt dirs removed once reported; the lock and the (empty) supervisors' records stay
    assert sorted(os.listdir(work_dir)) == [".lock", ".supervisors"]
    assert not os.listdir(os.path.join(work_dir, ".supervisors"))


def test_reports_ride_on_claims_for_what_they_free(fake, start_worker):
    """A busy worker's reports go in the claim for the cores they free: one
    request per task, never more tasks than cores."""
    names = ["t%d" % i for i in range(8)]
    for name in names:
        fake.submit(name, "true")
    runner = start_worker()
    wait_for(lambda: all(fake.finish_of(name) for name in names), what="eight reports")
    carried = [c for c in fake.claims if c.get("finished")]
    assert sorted(r["task"] for c in carried for r in c["finished"]) == sorted(names)
    assert any(c["max_tasks"] > 0 and c["free"]["cores"] > 0 for c in carried)  # and claimed with them
    assert all(c["free"]["cores"] <= 2 for c in fake.claims)
    assert runner.stop() == 0


def test_auto_prefetch_claims_beyond_the_slots_only_while_attempts_are_short(fake, start_worker):
    """The default, `--prefetch auto`: no prefetch until each of the last 4
    attempts ran under 0.25 s, then as many as the worker's cores; the
    report of a long attempt goes with a claim that prefetches nothing."""
    for i in range(8):
        fake.submit("s%d" % i, "true")
    runner = start_worker()
    wait_for(lambda: all(fake.finish_of("s%d" % i) for i in range(8)), what="eight reports")
    assert "prefetch" not in fake.claims[0]
    assert any(c.get("prefetch") == 2 for c in fake.claims)  # the worker's 2 cores
    fake.submit("long", "sleep 0.3")
    wait_for(lambda: fake.finish_of("long"), what="the long one's report")
    [carried] = [c for c in fake.claims if any(r["task"] == "long" for r in c.get("finished") or [])]
    assert "prefetch" not in carried
    assert runner.stop() == 0


def test_prefetch_0_never_claims_beyond_the_slots(fake, start_worker):
    for i in range(8):
        fake.submit("s%d" % i, "true")
    runner = start_worker(prefetch=0)
    wait_for(lambda: all(fake.finish_of("s%d" % i) for i in range(8)), what="eight reports")
    assert not any("prefetch" in c for c in fake.claims)
    assert runner.stop() == 0


@pytest.mark.slow
def test_claims_only_what_fits_beside_running_tasks(fake, start_worker, tmp_path):
    gate = tmp_path / "gate"
    fake.submit("first", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    start_worker()
    wait_for(lambda: fake.tasks["first"]["state"] == "running", what="first claim")
    fake.submit("second", "true")
    # While "first" holds one core of two, claims offer one core (none while both run).
    wait_for(lambda: fake.finish_of("second"), what="second task")
    offered = [c["free"]["cores"] for c in fake.claims]
    assert offered[0] == 2 and 1 in offered
    assert set(offered) <= {0, 1, 2}
    gate.touch()
    wait_for(lambda: fake.finish_of("first"), what="first task")
    count = len(fake.claims)
    wait_for(lambda: len(fake.claims) > count + 1, what="later claims")
    assert fake.claims[-1]["free"]["cores"] == 2  # everything came back


def test_heartbeats_carry_usage_and_progress(fake, start_worker):
    fake.submit("slow", "echo '0.25 quarter' >> \"$BANYAN_PROGRESS_FILE\"; sleep 30")
    start_worker()

    def reported():
        for beat in fake.workers.get("w1", {}).get("heartbeats", []):
            entry = beat["tasks"].get("slow")
            if entry and "progress" in entry:
                return entry
        return None

    entry = wait_for(reported, what="a heartbeat with progress")
    assert entry["attempt"] == 1
    assert entry["progress"] == {"fraction": 0.25, "message": "quarter"}
    assert entry["usage"]["max_rss"] > 0


def test_new_progress_goes_out_before_the_next_heartbeat_is_due(fake, start_worker, tmp_path):
    gate = tmp_path / "gate"
    fake.submit(
        "slow", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo '0.5 half' >> \"$BANYAN_PROGRESS_FILE\"; sleep 30"
    )
    start_worker(heartbeat=20, timeout=60)
    wait_for(lambda: fake.tasks["slow"]["state"] == "running", what="the task to start")
    gate.touch()

    def carried():
        beats = fake.workers.get("w1", {}).get("heartbeats", [])
        return [b for b in beats if "progress" in (b["tasks"].get("slow") or {})]

    # heartbeats are 20 s apart: the progress must not wait for the next one
    beat = wait_for(carried, what="a heartbeat with the new progress", timeout=10)[0]
    assert beat["tasks"]["slow"]["progress"] == {"fraction": 0.5, "message": "half"}


def test_cancel_in_a_heartbeat_terminates_and_reports_cancelled(fake, start_worker, tmp_path):
    pidfile = tmp_path / "pid"
    fake.submit("victim", f"echo $$ > {pidfile}; exec sleep 60", max_shutdown_time=1)
    start_worker(claim_wait=5)
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="task start"))
    fake.cancel("victim")
    report = wait_for(lambda: fake.finish_of("victim"), what="cancel report")
    assert (report["outcome"], report["exit_code"]) == ("cancelled", -signal.SIGTERM)
    assert fake.tasks["victim"]["state"] == "cancelled"
    assert conftest.killed(pid)


@pytest.mark.slow
def test_unknown_tasks_are_killed_and_dropped(fake, start_worker, tmp_path):
    pidfile = tmp_path / "pid"
    fake.submit("stolen", f"echo $$ > {pidfile}; exec sleep 60", max_shutdown_time=1)
    start_worker()
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="task start"))
    with fake.lock:  # the server no longer counts it as ours (e.g. requeued after we were marked lost)
        fake.tasks["stolen"]["state"] = "cancelled"
        fake.tasks["stolen"].pop("worker")
    wait_for(
        lambda: conftest.killed(pid),
        what="the task to be killed",
    )
    beats = len(fake.workers["w1"]["heartbeats"])
    wait_for(lambda: len(fake.workers["w1"]["heartbeats"]) >= beats + 3, what="three more heartbeats")
    assert fake.finish_of("stolen") is None  # still nothing reported


@pytest.mark.slow
def test_server_gone_past_timeout_kills_tasks_then_registers_again(fake, start_worker, tmp_path):
    pidfile = tmp_path / "pid"
    fake.submit("orphan", f"echo $$ > {pidfile}; exec sleep 60", max_shutdown_time=0.5)
    runner = start_worker(timeout=1.0, heartbeat=0.2)
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="task start"))
    fake.stop()
    wait_for(
        lambda: conftest.killed(pid),
        what="the task to be killed",
    )
    assert runner.thread.is_alive()  # the worker itself survives
    fake.restart()
    wait_for(lambda: "w2" in fake.workers, what="registration after the server came back")
    assert fake.finish_of("orphan") is None  # dropped, not reported
    assert runner.stop() == 0


def test_lost_worker_registers_again(fake, start_worker):
    start_worker()
    wait_for(lambda: fake.workers.get("w1", {}).get("heartbeats"), what="first heartbeat")
    with fake.lock:
        fake.workers["w1"]["state"] = "lost"
    wait_for(lambda: "w2" in fake.workers, what="a new registration")
    fake.submit("after", "echo again")
    report = wait_for(lambda: fake.finish_of("after"), what="a task on the new registration")
    assert report["stdout"] == "again\n"


def test_reports_are_retried_until_the_server_takes_them(fake, start_worker, tmp_path):
    gate = tmp_path / "gate"
    fake.submit("patient", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done")
    runner = start_worker(timeout=5.0, heartbeat=0.2)
    wait_for(lambda: fake.tasks["patient"]["state"] == "running", what="claim")
    fake.stop()
    gate.touch()
    # the task ends while the server is away; the report waits
    wait_for(lambda: "patient" in runner.worker.holdings.unreported, what="the task to end")
    fake.restart()
    report = wait_for(lambda: fake.finish_of("patient"), what="the delayed report")
    assert (report["outcome"], report["stdout"]) == ("success", "done\n")
    assert runner.stop() == 0


def test_drain_timeout_terminates_running_tasks_as_failures(fake, start_worker, tmp_path):
    started = tmp_path / "started"
    fake.submit("long", f"touch {started}; exec sleep 60", max_shutdown_time=1)
    runner = start_worker(drain=0.3)
    wait_for(started.exists, what="task start")
    assert runner.stop() == 0
    report = fake.finish_of("long")
    assert (report["outcome"], report["exit_code"]) == ("failure", -signal.SIGTERM)
    assert fake.workers["w1"]["state"] == "stopped"


def worker_process(fake, tmp_path, *flags):
    """A real `banyan-worker` process against the fake server (heartbeats
    every 0.2 s, 1 s claims), for the tests about signals; stderr piped."""
    command = [sys.executable, "-m", "banyan.worker", "--server", fake.url, "--heartbeat", "0.2"]
    command += ["--timeout", "10", *flags, "--claim-wait", "1", "--work-dir", str(tmp_path / "work")]
    return subprocess.Popen(command + ["--log-level", "WARNING"], stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_drains_then_exits_cleanly(fake, tmp_path):
    started = tmp_path / "started"
    fake.submit("short", f"touch {started}; sleep 1; echo finished")
    proc = worker_process(fake, tmp_path, "--drain", "8")
    try:
        # the task runs on the worker (not only claimed: a claim answer still
        # in flight when the worker stops is the server's to give back)
        wait_for(started.exists, what="task start")
        fake.submit("late", "echo should not run")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=8) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    report = fake.finish_of("short")
    assert (report["outcome"], report["stdout"]) == ("success", "finished\n")
    assert fake.workers["w1"]["state"] == "stopped"


def test_sigterm_while_registering_stops_once_registered(fake, tmp_path):
    """A signal that comes before the server's answer to the registration
    stops the worker cleanly once it is registered: it unregisters and
    exits 0, claiming nothing (it was killed outright, leaving a worker the
    server would only mark lost later)."""
    fake.registration_gate = threading.Event()
    fake.submit("unwanted", "echo should not run")
    proc = worker_process(fake, tmp_path)
    try:
        wait_for(lambda: ("POST", "/workers") in fake.requests, timeout=30, what="the registration")
        proc.send_signal(signal.SIGTERM)
        fake.registration_gate.set()
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [w["state"] for w in fake.workers.values()] == ["stopped"]
    assert fake.tasks["unwanted"]["state"] == "available" and not fake.claims


def test_second_signal_kills_tasks_at_once(fake, tmp_path):
    pidfile = tmp_path / "pid"
    fake.submit("stubborn", f"echo $$ > {pidfile}; trap '' TERM; exec sleep 60", max_shutdown_time=60)
    proc = worker_process(fake, tmp_path, "--drain", "60")
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="task start"))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=8) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert conftest.killed(pid)
    assert fake.finish_of("stubborn")["exit_code"] == -signal.SIGKILL


@pytest.mark.slow
def test_cannot_reach_the_server_at_start_exits_3(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "banyan.worker",
            "--server",
            "http://127.0.0.1:9",
            "--work-dir",
            str(tmp_path / "w"),
            "--log-level",
            "CRITICAL",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3


@pytest.mark.parametrize(
    "args",
    [
        ["--memory", "lots"],
        ["--cores", "-1"],
        ["--max-tasks", "0"],
        ["--heartbeat", "10", "--timeout", "5"],
        ["--prefetch", "some"],
        ["--prefetch", "-1"],
        [],
    ],
)
def test_bad_arguments_exit_2(args, monkeypatch):
    from banyan.worker.__main__ import main

    monkeypatch.delenv("BANYAN_SERVER", raising=False)
    server = [] if args == [] else ["--server", "http://127.0.0.1:9"]
    try:
        code = main(server + args)
    except SystemExit as exc:
        code = exc.code
    assert code == 2


@pytest.mark.parametrize("failure", ["500", "reset"])
@pytest.mark.slow
def test_server_errors_and_resets_never_stop_the_worker(fake, start_worker, failure):
    fake.fail_next = 2  # the first registrations fail: retried, not fatal
    runner = start_worker(heartbeat=0.2, timeout=30, claim_wait=0.5)
    wait_for(lambda: "w1" in fake.workers, timeout=15, what="registration after two 500s")
    fake.failure = failure  # every claim and heartbeat fails for a while
    failed = fake.failed
    wait_for(lambda: fake.failed >= failed + 6, what="requests failing")
    assert runner.thread.is_alive()
    fake.failure = None
    fake.submit("after", "echo recovered")
    report = wait_for(lambda: fake.finish_of("after"), timeout=20, what="a task after the outage")
    assert (report["outcome"], report["stdout"]) == ("success", "recovered\n")
    assert list(fake.workers) == ["w1"]  # never reset: the outage was shorter than the timeout
    assert runner.stop() == 0


class StubClient:
    """Answers heartbeats with a fixed reply, as a late answer from the server would."""

    def __init__(self, reply):
        self.reply = reply
        self.sent = []

    def heartbeat(self, wid, tasks):
        self.sent.append(tasks)
        return dict(self.reply)

    def close(self):
        pass


def test_a_late_unknown_kills_only_the_attempt_it_was_about(tmp_path):
    """A heartbeat reports attempt 1; before its answer ("unknown": attempt 1
    was finished) arrives, the task was retried and claimed again by this
    worker. The answer must not kill attempt 2."""
    from banyan.worker.executor import TaskProcess

    stub = StubClient({"cancel": [], "unknown": ["t"]})
    worker = Worker(
        WorkerConfig(server="http://127.0.0.1:9", cores=1, memory="1 GiB", gpus=0, work_dir=str(tmp_path / "work")),
        client_factory=lambda **kw: stub,
    )
    worker.worker_id = "w1"
    proc = TaskProcess({"_id": "t", "command": "sleep 30", "max_shutdown_time": 1}, 2, tmp_path / "a2")
    proc.start()
    try:
        worker.holdings.running["t"] = proc
        stale = {"t": {"attempt": 1, "usage": {"max_rss": 0, "cpu_percent": 0.0}}}
        worker.heartbeats.payload = lambda: stale  # built while attempt 1 ran
        worker.heartbeats.beat()
        worker.supervision.apply_control()
        assert worker.holdings.running.get("t") is proc and proc.poll() is None
        del worker.heartbeats.payload  # now about attempt 2 itself
        worker.heartbeats.beat()
        assert stub.sent[-1]["t"]["attempt"] == 2
        worker.supervision.apply_control()
        assert "t" not in worker.holdings.running and worker.holdings.doomed.get("t") is proc
        wait_for(lambda: proc.poll() is not None, what="attempt 2 to be killed")
    finally:
        proc.kill()


def test_an_unknown_about_a_reported_attempt_keeps_the_next_one_waiting(tmp_path):
    """The claim that carried attempt 1's report brought attempt 2 of the
    same task, which waits for room (prefetched). A heartbeat made while
    attempt 1's report was not settled reports the task as attempt 1, and
    the server answers "unknown" (attempt 1 is over): attempt 2 stays, to
    start here. An "unknown" about attempt 2 itself drops it."""
    stub = StubClient({"cancel": [], "unknown": ["t"]})
    worker = Worker(
        WorkerConfig(server="http://127.0.0.1:9", cores=1, memory="1 GiB", gpus=0, work_dir=str(tmp_path / "work")),
        client_factory=lambda **kw: stub,
    )
    worker.worker_id = "w1"
    holdings = worker.holdings
    second = {"_id": "t", "command": "true", "history": [{"attempt": 1}, {"attempt": 2}]}
    holdings.waiting.append((second, time.monotonic()))
    holdings.unreported["t"] = {"task_id": "t", "attempt": 1, "usage": {}, "worker_id": "w1"}
    worker.heartbeats.beat()
    assert stub.sent[-1]["t"]["attempt"] == 1
    assert [task for task, _ in holdings.waiting] == [second]
    del holdings.unreported["t"]  # attempt 1's report settled
    worker.heartbeats.beat()
    assert stub.sent[-1]["t"]["attempt"] == 2
    assert holdings.waiting == []


class ClaimStub:
    """Answers claims with whatever `reply` holds."""

    def __init__(self, **unused):
        self.reply = None

    def claim(self, wid, free, max_tasks, wait):
        return self.reply

    def close(self):
        pass


def test_a_dying_attempt_frees_only_its_own_resources(tmp_path):
    """Attempt 1 is being killed (the server requeued it) when the same task
    comes back as attempt 2: attempt 1's end must not free what attempt 2
    holds, or the worker would take more than it has."""
    worker = Worker(
        WorkerConfig(server="http://127.0.0.1:9", cores=4, memory=0, gpus=2, work_dir=str(tmp_path / "work")),
        client_factory=ClaimStub,
    )
    worker.worker_id = "w1"
    task = {
        "_id": "t" * 24,
        "command": "sleep 30",
        "max_shutdown_time": 1,
        "requested_resources": {"cores": 2, "gpus": 1},
        "history": [{"attempt": 1}],
    }
    claimer, supervision, holdings = worker.claimer, worker.supervision, worker.holdings
    claimer.client.reply = {"_items": [task], "cancel": []}
    claimer.claim_once(wait=0)
    supervision.start_claimed()
    first = holdings.running[task["_id"]]
    try:
        holdings.control.append(("unknown", task["_id"], 1))
        supervision.apply_control()
        claimer.client.reply = {"_items": [dict(task, history=[{"attempt": 1}, {"attempt": 2}])], "cancel": []}
        claimer.claim_once(wait=0)
        supervision.start_claimed()
        second = holdings.running[task["_id"]]
        assert second is not first and holdings.free()["cores"] == 2
        wait_for(
            lambda: (supervision.supervise(time.monotonic()), first.poll() is not None)[1],
            what="attempt 1 to be killed",
        )
        supervision.supervise(time.monotonic())
        assert task["_id"] not in holdings.doomed and second.poll() is None
        assert holdings.free() == {"cores": 2, "memory": 0, "gpus": 1}
    finally:
        first.kill()
        holdings.running[task["_id"]].kill()


def test_tasks_are_told_their_cores_and_pinned_to_cpus_of_their_own(fake, start_worker, tmp_path):
    """With --pin, two one-core tasks running together get distinct CPUs; the
    thread-count variables follow the cores granted unless the task sets them."""
    cpus = resources.usable_cpus()
    if len(cpus) < 2:
        pytest.skip("this machine lets us use only one CPU")
    script = (
        "import json, os, sys, time; here = sys.argv[1]; me, other = sys.argv[2:4]; "
        "env = {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', "
        "'OPENBLAS_NUM_THREADS', 'NUMEXPR_NUM_THREADS', 'BANYAN_CORES', 'BANYAN_CPUS')}; "
        "json.dump({'cpus': sorted(os.sched_getaffinity(0)), 'env': env}, open(os.path.join(here, me), 'w')); "
        "deadline = time.time() + 20\n"
        "while not os.path.exists(os.path.join(here, other)) and time.time() < deadline: time.sleep(0.02)"
    )
    for me, other in (("a", "b"), ("b", "a")):
        fake.submit(me, [sys.executable, "-c", script, str(tmp_path), me, other])
    fake.submit(
        "half",
        [sys.executable, "-c", script, str(tmp_path), "half", "half"],
        requested_resources={"cores": 0.5, "memory": 0, "gpus": 0},
        environment={"MKL_NUM_THREADS": "7"},
    )
    start_worker(pin=True, cores=2)
    wait_for(lambda: all(fake.finish_of(t) for t in ("a", "b", "half")), what="three reports")
    assert all(fake.finish_of(t)["outcome"] == "success" for t in ("a", "b", "half"))
    a, b, half = (json.loads((tmp_path / name).read_text()) for name in ("a", "b", "half"))
    assert len(a["cpus"]) == len(b["cpus"]) == 1 and not set(a["cpus"]) & set(b["cpus"])
    assert a["env"] == {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "BANYAN_CORES": "1",
        "BANYAN_CPUS": str(a["cpus"][0]),
    }
    assert (half["env"]["OMP_NUM_THREADS"], half["env"]["MKL_NUM_THREADS"], half["env"]["BANYAN_CORES"]) == (
        "1",
        "7",
        "0.5",
    )


def test_cpu_allocator_hands_out_distinct_cpus_then_shares_the_least_used():
    cpus = resources.CpuAllocator([0, 1, 2, 3])
    assert cpus.take("a", 2) == [0, 1] and cpus.take("b", 1.5) == [2, 3]
    assert cpus.take("c", 1) == [0] and cpus.take("zero", 0) is None
    cpus.give_back("b")
    assert cpus.take("d", 3) == [1, 2, 3]
    assert cpus.take("e", 64) == [0, 1, 2, 3]  # never more than there are


def test_a_finished_task_is_in_heartbeats_until_its_report_is_delivered(fake, start_worker):
    """While its report cannot be delivered, a finished attempt is still
    reported alive, so the server keeps it; once delivered, it is not."""
    fake.finish_down = True
    fake.submit("done", "echo finished")
    runner = start_worker(heartbeat=0.2, timeout=30)
    wait_for(lambda: fake.refused_reports, what="a report attempt")

    def beats():
        with fake.lock:
            return list(fake.workers["w1"]["heartbeats"])

    seen = len(beats())
    later = wait_for(lambda: beats()[seen:], what="a heartbeat after the task ended")
    assert later[0]["tasks"]["done"]["attempt"] == 1
    assert fake.finish_of("done") is None
    fake.finish_down = False
    report = wait_for(lambda: fake.finish_of("done"), timeout=20, what="the report, once possible")
    assert (report["outcome"], report["stdout"]) == ("success", "finished\n")
    seen = len(beats())
    wait_for(lambda: beats()[seen:], what="a heartbeat after the report")
    assert "done" not in beats()[-1]["tasks"]
    assert runner.stop() == 0


@pytest.mark.slow
def test_a_claim_turned_away_waits_the_servers_retry_after(fake, start_worker):
    fake.retry_after = 2.5  # longer than the worker's own idle backoff (2 s at most)
    runner = start_worker(claim_wait=1)
    wait_for(lambda: len(fake.claim_times) >= 3, timeout=20, what="three claims")
    with fake.lock:
        times = list(fake.claim_times)
    assert all(b - a >= 2.5 for a, b in zip(times, times[1:])), times
    # work that arrives is still claimed after the pause
    fake.submit("t", "echo hi")
    assert wait_for(lambda: fake.finish_of("t"), timeout=20, what="the task")["outcome"] == "success"
    assert runner.stop() == 0
