"""banyan-worker end to end: a real `banyan server` process on loopback, real
`banyan-worker` processes, real tasks, real signals.

Everything is observed the way a user would: through the HTTP API (task
documents, history, logs, workers) and through the operating system (the
processes a task started, its process group). Waits poll with generous
deadlines; nothing here asserts how fast anything is (that is bench/'s job).

History times are the server's: `started` when the claim took the task,
`ended` when the worker's report (or the reaper) ended the attempt, so each
history interval holds the real run. Tasks whose order or overlap matters
also write their own clock readings to a file, which is checked as well.
"""

import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime, timezone

import psutil
import pytest
from conftest import CheckedSession, LiveServer, wait_for

pytestmark = pytest.mark.slow

#: The server's heartbeat timeout in these tests (seconds) and the workers' heartbeat interval.
HEARTBEAT_TIMEOUT = 4
HEARTBEAT = 0.5
FINISHED = ("terminated", "cancelled")


def worker_command():
    script = os.path.join(os.path.dirname(sys.executable), "banyan-worker")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "banyan.worker"]


def when(date):
    """A history time (ISO 8601 UTC, as docs/API.md says) as a POSIX timestamp."""
    return datetime.strptime(date, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def gone(pid):
    """True once `pid` no longer exists (a zombie still counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def group_gone(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def max_overlap(intervals):
    """Most total weight running at one instant; intervals are (start, end, weight), end exclusive."""
    best = 0
    for t, _, _ in intervals:
        best = max(best, sum(w for s, e, w in intervals if s <= t < e))
    return best


class Cluster:
    """One live server and the banyan-worker processes of a test."""

    def __init__(self, tmp_path, server_args=()):
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.server = LiveServer(
            tmp_path / "server-data", ["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)] + list(server_args)
        ).start()
        self.url = self.server.url
        self.http = CheckedSession()
        self.workers = {}  # name -> Popen
        self.logs = {}

    # -- workers --

    def start_worker(self, name, *args, token=None):
        command = (
            worker_command()
            + [
                "--server",
                self.url,
                "--host",
                name,
                "--heartbeat",
                str(HEARTBEAT),
                "--timeout",
                "10",
                "--claim-wait",
                "5",
                "--drain",
                "10",
                "--memory",
                "1 GiB",
                "--gpus",
                "0",
                "--work-dir",
                str(self.tmp / "work" / name),
            ]
            + list(args)
        )
        if token:
            command += ["--token", token]
        log = open(self.tmp / ("%s.log" % name), "ab")
        self.logs[name] = log
        self.workers[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        return self.workers[name]

    def worker_ids(self, names, state="active"):
        """{name: worker id} once every named worker is registered and in `state`."""

        def registered():
            items = self.http.get(self.url + "/workers", params={"state": state}).json()["_items"]
            found = {w["host"]: w["_id"] for w in items if w["host"] in names}
            return found if len(found) == len(names) else None

        return wait_for(registered, 30, "workers %s to be %s" % (names, state))

    def stop_worker(self, name, sig=signal.SIGTERM, timeout=30):
        proc = self.workers[name]
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)

    def worker_log(self, name):
        return (self.tmp / ("%s.log" % name)).read_text(errors="replace")

    # -- tasks --

    def submit(self, tasks):
        r = self.http.post(self.url + "/tasks", json=tasks)
        assert r.status_code == 201, r.text
        body = r.json()
        return [item["_id"] for item in body["_items"]] if isinstance(tasks, list) else body["_id"]

    def task(self, task_id):
        r = self.http.get(self.url + "/tasks/" + task_id)
        assert r.status_code == 200, r.text
        return r.json()

    def tasks(self):
        r = self.http.get(self.url + "/tasks", params={"max_results": 10000})
        assert r.status_code == 200, r.text
        return {t["_id"]: t for t in r.json()["_items"]}

    def count(self, states):
        where = json.dumps({"state": {"$in": list(states)}})
        r = self.http.get(self.url + "/tasks", params={"where": where, "max_results": 1})
        return r.json()["_meta"]["total"]

    def wait_finished(self, task_ids, timeout=40):
        def finished():
            docs = [self.task(t) for t in task_ids]
            return docs if all(d["state"] in FINISHED for d in docs) else None

        return wait_for(finished, timeout, "tasks %s to finish" % task_ids, interval=0.2)

    def logs_of(self, task_id, attempt=None):
        params = {"attempt": attempt} if attempt is not None else None
        r = self.http.get(self.url + "/tasks/%s/logs" % task_id, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self):
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.send_signal(signal.SIGINT)  # second signal: kill tasks now
        for proc in self.workers.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs.values():
            log.close()
        self.http.close()
        self.server.stop()


@pytest.fixture
def cluster(tmp_path):
    clusters = []

    def make(*server_args):
        c = Cluster(tmp_path / ("c%d" % len(clusters)), server_args)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.close()
    for c in clusters:
        assert c.server.server_errors() == []
        for name in c.workers:
            text = c.worker_log(name)
            assert "Traceback" not in text, "worker %s logged a traceback:\n%s" % (name, text[-5000:])


def test_two_hundred_tasks_over_two_workers_each_run_once_with_their_output(cluster):
    c = cluster()
    c.start_worker("alpha", "--cores", "1")
    c.start_worker("beta", "--cores", "1")
    ids = c.worker_ids(["alpha", "beta"])
    task_ids = c.submit(
        [
            {
                "name": "echo-%d" % i,
                "command": ["sh", "-c", "echo $X"],
                "environment": {"X": "value-%d" % i},
                "state": "available",
            }
            for i in range(200)
        ]
    )
    assert len(task_ids) == 200
    wait_for(lambda: c.count(FINISHED) == 200, 120, "200 tasks to finish", interval=0.5)

    tasks = c.tasks()
    assert set(tasks) == set(task_ids)
    ran_on = set()
    for i, task_id in enumerate(task_ids):
        task = tasks[task_id]
        assert (task["state"], task["exit_status"], task["retry_count"]) == ("terminated", "success", 0), task
        assert len(task["history"]) == 1, task["history"]  # ran exactly once
        attempt = task["history"][0]
        assert (attempt["attempt"], attempt["exit_status"], attempt["exit_code"]) == (1, "success", 0)
        assert attempt["worker"] in ids.values()
        ran_on.add(attempt["worker"])
        assert c.logs_of(task_id) == {"attempt": 1, "stdout": "value-%d\n" % i, "stderr": ""}
    assert ran_on == set(ids.values())  # both workers took part
    # The workers are idle and hold nothing.
    for wid in ids.values():
        assert c.http.get(c.url + "/workers/" + wid).json()["running"] == []
    assert c.stop_worker("alpha") == 0 and c.stop_worker("beta") == 0
    assert c.worker_ids(["alpha", "beta"], state="stopped") == ids


def test_cancelling_a_task_that_ignores_sigterm_kills_its_whole_group(cluster, tmp_path):
    c = cluster()
    c.start_worker("alpha", "--cores", "1")
    c.worker_ids(["alpha"])
    leader_file = tmp_path / "leader"
    command = "echo $$ > %s; trap '' TERM; sleep 60 & sleep 60 & wait" % leader_file
    task_id = c.submit({"name": "stubborn", "command": command, "max_shutdown_time": 1, "state": "available"})

    pgid = int(wait_for(lambda: leader_file.exists() and leader_file.read_text().strip(), 30, "the task to start"))
    leader = psutil.Process(pgid)
    children = wait_for(
        lambda: len(leader.children(recursive=True)) == 2 and leader.children(recursive=True),
        10,
        "the task's two children",
    )
    group = [pgid] + [p.pid for p in children]
    assert all(os.getpgid(pid) == pgid for pid in group)  # a group of its own, children included
    assert os.getpgid(pgid) != os.getpgid(c.workers["alpha"].pid)
    assert c.task(task_id)["state"] == "running"

    r = c.http.patch(c.url + "/tasks/" + task_id, json={"state": "cancelled"})
    assert r.status_code == 200, r.text
    assert c.task(task_id)["state"] in ("pending_cancellation", "cancelled")

    [task] = c.wait_finished([task_id], timeout=30)
    assert (task["state"], task["exit_status"]) == ("cancelled", "cancelled")
    [attempt] = task["history"]
    assert attempt["exit_status"] == "cancelled"
    assert attempt["exit_code"] == -signal.SIGKILL  # SIGTERM was ignored: it took a SIGKILL
    wait_for(lambda: group_gone(pgid), 10, "process group %d to be gone" % pgid)
    assert all(gone(pid) for pid in group)
    # The worker lives on and takes the next task.
    after = c.submit({"name": "after", "command": "echo still here", "state": "available"})
    [task] = c.wait_finished([after])
    assert task["exit_status"] == "success"
    assert c.logs_of(after)["stdout"] == "still here\n"


def test_a_task_of_a_worker_killed_with_sigkill_runs_again_on_the_other_worker(cluster, tmp_path):
    c = cluster()
    c.start_worker("alpha", "--cores", "1")
    c.start_worker("beta", "--cores", "1")
    ids = c.worker_ids(["alpha", "beta"])
    names = {wid: name for name, wid in ids.items()}
    runs = tmp_path / "runs"
    # The first attempt runs until its worker is killed, however long the test takes to get there.
    command = (
        'echo "$BANYAN_ATTEMPT $$" >> %s; if [ "$BANYAN_ATTEMPT" = 1 ]; then sleep 60; fi; '
        'echo "finished attempt $BANYAN_ATTEMPT"' % runs
    )
    task_id = c.submit({"name": "survivor", "command": command, "max_retries": 0, "state": "available"})
    orphans = []
    try:
        wait_for(lambda: runs.exists() and runs.read_text().count("\n") == 1, 30, "the first attempt to start")
        orphans.append(int(runs.read_text().split()[1]))
        first = c.task(task_id)
        assert first["state"] == "running"
        victim = names[first["worker"]]
        survivor = "beta" if victim == "alpha" else "alpha"
        c.workers[victim].kill()  # SIGKILL: no goodbye, no report
        c.workers[victim].wait()

        [task] = c.wait_finished([task_id], timeout=60)
        orphans += [int(line.split()[1]) for line in runs.read_text().splitlines()[1:]]
        # a lost worker spends `lost_count`, not the task's retries (it has none)
        assert (task["state"], task["exit_status"], task["retry_count"], task["lost_count"]) == (
            "terminated",
            "success",
            0,
            1,
        )
        lost, rerun = task["history"]
        assert (lost["worker"], lost["exit_status"]) == (ids[victim], "abandoned (worker unreachable)")
        assert (rerun["worker"], rerun["attempt"], rerun["exit_status"]) == (ids[survivor], 2, "success")
        assert when(rerun["started"]) >= when(lost["ended"])
        assert [line.split()[0] for line in runs.read_text().splitlines()] == ["1", "2"]
        assert c.logs_of(task_id)["stdout"] == "finished attempt 2\n"
        worker = c.http.get(c.url + "/workers/" + ids[victim]).json()
        assert worker["state"] == "lost"
    finally:
        for pid in orphans:  # the killed worker could not stop its task's group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_diamond_graph_runs_in_dependency_order_with_tokens(cluster, tmp_path):
    c = cluster("--auth")
    admin = open(os.path.join(c.server.data_dir, "admin.token")).read().strip()
    tokens = {}
    for role, name in (("worker", "farm"), ("user", "alice")):
        r = c.http.post(
            c.url + "/tokens", json={"role": role, "name": name}, headers={"Authorization": "Bearer " + admin}
        )
        assert r.status_code == 201, r.text
        tokens[role] = r.json()["token"]
    c.http.headers["Authorization"] = "Bearer " + tokens["user"]
    c.start_worker("alpha", "--cores", "1", token=tokens["worker"])
    c.start_worker("beta", "--cores", "1", token=tokens["worker"])
    c.worker_ids(["alpha", "beta"])

    trace = tmp_path / "trace"

    def step(name):
        return "echo %s start $(date +%%s.%%N) >> %s; sleep 0.5; echo %s end $(date +%%s.%%N) >> %s" % (
            name,
            trace,
            name,
            trace,
        )

    d = c.submit({"name": "D", "command": step("D")})  # inactive until B and C end
    b = c.submit({"name": "B", "command": step("B"), "continuations": [d]})
    cc = c.submit({"name": "C", "command": step("C"), "continuations": [d]})
    assert c.task(d)["pending_dependency_count"] == 2
    a = c.submit({"name": "A", "command": step("A"), "continuations": [b, cc], "state": "available"})
    assert c.task(b)["pending_dependency_count"] == 1

    docs = dict(zip("ABCD", c.wait_finished([a, b, cc, d], timeout=60)))
    for task in docs.values():
        assert (task["state"], task["exit_status"], task["owner"]) == ("terminated", "success", "alice"), task
        assert len(task["history"]) == 1
    start = {n: when(t["history"][0]["started"]) for n, t in docs.items()}
    end = {n: when(t["history"][0]["ended"]) for n, t in docs.items()}
    for parent, child in (("A", "B"), ("A", "C"), ("B", "D"), ("C", "D")):
        assert end[parent] <= start[child], (parent, child, docs)
    # The tasks' own clocks, to the nanosecond.
    seen = {}
    for line in trace.read_text().splitlines():
        name, what, stamp = line.split()
        seen[name, what] = float(stamp)
    assert len(seen) == 8
    for parent, child in (("A", "B"), ("A", "C"), ("B", "D"), ("C", "D")):
        assert seen[parent, "end"] < seen[child, "start"], (parent, child, seen)


def test_a_two_core_worker_never_runs_more_than_two_cores_of_tasks(cluster, tmp_path):
    c = cluster()
    c.start_worker("alpha", "--cores", "2")
    c.worker_ids(["alpha"])
    trace = tmp_path / "trace"
    command = "echo $$ $CORES start $(date +%%s.%%N) >> %s; sleep 0.5; echo $$ $CORES end $(date +%%s.%%N) >> %s" % (
        trace,
        trace,
    )
    tasks = [
        {
            "name": "one-%d" % i,
            "requested_resources": {"cores": 1},
            "environment": {"CORES": "1"},
            "command": command,
            "state": "available",
        }
        for i in range(6)
    ]
    tasks.append(dict(tasks[0], name="two", requested_resources={"cores": 2}, environment={"CORES": "2"}))
    task_ids = c.submit(tasks)
    docs = c.wait_finished(task_ids, timeout=60)
    intervals = []
    for task in docs:
        assert (task["state"], task["exit_status"]) == ("terminated", "success")
        [attempt] = task["history"]
        intervals.append((when(attempt["started"]), when(attempt["ended"]), task["requested_resources"]["cores"]))
    assert max_overlap(intervals) == 2  # from history
    one_core = [(s, e, w) for s, e, w in intervals if w == 1]
    assert max_overlap(one_core) == 2  # two at a time, never three
    times = {}
    for line in trace.read_text().splitlines():
        pid, cores, what, stamp = line.split()
        times.setdefault((pid, int(cores)), {})[what] = float(stamp)
    assert sorted(cores for _, cores in times) == [1] * 6 + [2]
    processes = [(t["start"], t["end"], cores) for (_, cores), t in times.items()]
    assert max_overlap(processes) <= 2  # from the tasks' own clocks


def test_output_is_capped_to_its_last_mebibyte_and_progress_is_reported(cluster, tmp_path):
    c = cluster()
    c.start_worker("alpha", "--cores", "1")
    c.worker_ids(["alpha"])
    first, second = tmp_path / "first", tmp_path / "second"
    banyan = os.path.join(os.path.dirname(sys.executable), "banyan")
    banyan = banyan if os.path.exists(banyan) else "%s -m banyan.cli" % sys.executable
    command = (
        "%s progress 0.25 a quarter; "
        "while [ ! -e %s ]; do sleep 0.05; done; "
        'echo "0.5 half way there" >> "$BANYAN_PROGRESS_FILE"; '
        "while [ ! -e %s ]; do sleep 0.05; done; "
        'head -c 1572864 /dev/zero | tr "\\0" x; echo; echo END; echo oops >&2' % (banyan, first, second)
    )
    task_id = c.submit({"name": "chatty", "command": command, "state": "available"})

    def progress(fraction):
        current = c.task(task_id).get("current_history") or {}
        reported = current.get("progress") or {}
        return reported if reported.get("fraction") == fraction else None

    reported = wait_for(lambda: progress(0.25), 30, "`banyan progress` to reach the server")
    assert reported["message"] == "a quarter"
    first.touch()
    reported = wait_for(lambda: progress(0.5), 30, "the progress file's line to reach the server")
    assert reported["message"] == "half way there"
    second.touch()
    [task] = c.wait_finished([task_id])
    assert task["exit_status"] == "success"
    assert c.stop_worker("alpha") == 0  # the logs outlive the worker
    logs = c.logs_of(task_id)
    assert len(logs["stdout"].encode()) == 1024 * 1024
    assert logs["stdout"].endswith("x\nEND\n") and set(logs["stdout"][: -len("\nEND\n")]) == {"x"}
    assert logs["stderr"] == "oops\n"


def test_sigterm_drains_the_worker_then_terminates_what_is_left(cluster, tmp_path):
    c = cluster()
    c.start_worker("alpha", "--cores", "2", "--drain", "2.5")
    [wid] = c.worker_ids(["alpha"]).values()
    gate = tmp_path / "gate"  # `short` ends once the worker drains, however long getting there took
    short = c.submit(
        {"name": "short", "command": "while [ ! -e %s ]; do sleep 0.05; done; echo done" % gate, "state": "available"}
    )
    long = c.submit({"name": "long", "command": "sleep 60", "max_shutdown_time": 1, "state": "available"})
    wait_for(
        lambda: c.task(short)["state"] == "running" and c.task(long)["state"] == "running", 30, "both tasks to run"
    )
    c.workers["alpha"].send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: no new tasks" in c.worker_log("alpha"), 10, "the worker to start draining")
    gate.touch()
    late = c.submit({"name": "late", "command": "echo too late", "state": "available"})
    assert c.workers["alpha"].wait(timeout=30) == 0
    docs = {t["name"]: t for t in (c.task(short), c.task(long), c.task(late))}
    assert (docs["short"]["exit_status"], c.logs_of(short)["stdout"]) == ("success", "done\n")
    assert docs["long"]["exit_status"] == "failure"
    assert docs["long"]["history"][0]["exit_code"] == -signal.SIGTERM
    assert (docs["late"]["state"], docs["late"]["history"]) == ("available", [])  # never claimed
    worker = c.http.get(c.url + "/workers/" + wid).json()
    assert (worker["state"], worker["running"]) == ("stopped", [])


def test_worker_outlives_a_server_restart_kills_its_task_and_registers_again(cluster, tmp_path):
    c = cluster()
    c.start_worker("alpha", "--cores", "1", "--timeout", "2")
    [old] = c.worker_ids(["alpha"]).values()
    runs = tmp_path / "runs"
    command = (
        'echo "$BANYAN_ATTEMPT $$" >> %s; echo "attempt $BANYAN_ATTEMPT"; '
        'if [ "$BANYAN_ATTEMPT" = 1 ]; then sleep 60; fi' % runs
    )
    task_id = c.submit(
        {"name": "interrupted", "command": command, "max_retries": 1, "max_shutdown_time": 1, "state": "available"}
    )
    wait_for(lambda: runs.exists() and runs.read_text().strip(), 30, "the task to start")
    pid = int(runs.read_text().split()[1])
    c.server.kill(signal.SIGKILL)
    # Past its --timeout without the server, the worker kills the task's group itself.
    wait_for(lambda: group_gone(pid), 30, "the task to be killed while the server is away")
    assert c.workers["alpha"].poll() is None
    c.server.start()
    new = wait_for(
        lambda: [
            w["_id"]
            for w in c.http.get(c.url + "/workers").json()["_items"]
            if w["host"] == "alpha" and w["_id"] != old and w["state"] == "active"
        ],
        30,
        "the worker to register again",
    )
    # The old registration goes silent, is marked lost, and the task runs again.
    [task] = c.wait_finished([task_id], timeout=60)
    assert (task["state"], task["exit_status"]) == ("terminated", "success")
    lost, rerun = task["history"]
    assert (lost["worker"], lost["exit_status"]) == (old, "abandoned (worker unreachable)")
    assert rerun["worker"] == new[0]
    assert c.logs_of(task_id, 2)["stdout"] == "attempt 2\n"


def test_an_idle_worker_that_stops_leaves_later_tasks_to_others(cluster):
    c = cluster()
    c.start_worker("alpha", "--cores", "1", "--claim-wait", "20")
    [alpha] = c.worker_ids(["alpha"]).values()
    # alpha's claim is held open on the server when it is told to stop.
    assert c.stop_worker("alpha", signal.SIGINT) == 0
    assert c.http.get(c.url + "/workers/" + alpha).json()["state"] == "stopped"
    task_id = c.submit({"name": "later", "command": "echo later", "state": "available"})
    c.start_worker("beta", "--cores", "1")
    [beta] = c.worker_ids(["beta"]).values()
    [task] = c.wait_finished([task_id])
    assert task["exit_status"] == "success"
    assert [(a["worker"], a["exit_status"]) for a in task["history"]] == [(beta, "success")]


def test_prefetched_tasks_of_a_busy_worker_are_run_once_by_an_idle_one(cluster, tmp_path):
    c = cluster()
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    ran.mkdir()
    # The long task takes every core of "busy"; the short ones are prefetched beyond them.
    long_id = c.submit(
        {
            "name": "long",
            "command": "while [ ! -e %s ]; do sleep 0.05; done" % gate,
            "requested_resources": {"cores": 3},
            "state": "available",
        }
    )
    shorts = c.submit(
        [
            {"name": "s%d" % i, "command": 'echo "$BANYAN_SERVER" >> %s/s%d' % (ran, i), "state": "available"}
            for i in range(3)
        ]
    )
    c.start_worker("busy", "--cores", "3", "--prefetch", "3", "--prefetch-hold", "3")
    [busy] = c.worker_ids(["busy"]).values()

    def held_by_busy():
        docs = [c.task(t) for t in [long_id] + shorts]
        return all(d["state"] == "running" and d.get("worker") == busy for d in docs)

    wait_for(held_by_busy, 30, "the busy worker to run the long task and hold the short ones")
    c.start_worker("idle", "--cores", "1")
    [idle] = c.worker_ids(["idle"]).values()
    for doc in c.wait_finished(shorts):
        # one attempt, by the idle worker: the busy one handed it back unstarted
        assert [(a["attempt"], a["worker"], a["exit_status"]) for a in doc["history"]] == [(1, idle, "success")]
    assert sorted(os.listdir(ran)) == ["s0", "s1", "s2"]
    assert all((ran / name).read_text() == c.url + "\n" for name in ("s0", "s1", "s2"))  # each ran once
    assert re.search(r"handed back \d prefetched task", c.worker_log("busy"))
    long = c.task(long_id)
    assert long["state"] == "running" and long["worker"] == busy
    gate.touch()
    [long] = c.wait_finished([long_id])
    assert [(a["worker"], a["exit_status"]) for a in long["history"]] == [(busy, "success")]
