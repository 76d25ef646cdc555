"""Shared machinery of the reliability suite: a cluster of real processes
(one `banyan server`, several `banyan-worker`s), marker-writing task
commands, the rules' expected end state of every task, and the report
table the suite fills in (`test-output/reliability.md`).

Each attempt of a task run by this suite leaves a marker file
`<markers>/<task id>.<attempt>`: the command refuses to run if its marker
already exists (and records the duplicate), writes `started`, and at the
end the exit code it chose. So the markers say which attempts ran, which
ran twice, and how each one ended.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import requests
from conftest import LiveServer, TestSession, stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTPUT = os.path.join(ROOT, "test-output")
FIGURES = os.path.join(OUTPUT, "reliability.json")
TABLE = os.path.join(OUTPUT, "reliability.md")

#: What a task's command does: refuse a second run of the same attempt,
#: leave its marker, sleep a little, then exit with the code the attempt
#: drew (1 with probability FAIL_PERCENT %). $M is the marker directory.
TASK_SCRIPT = (
    'f="$M/$BANYAN_TASK_ID.$BANYAN_ATTEMPT"; '
    'if [ -e "$f" ]; then echo "$BANYAN_TASK_ID.$BANYAN_ATTEMPT" >> "$M/DUPLICATES"; exit 3; fi; '
    'echo started > "$f"; '
    'sleep "$SLEEP"; '
    "r=$(od -An -N2 -tu2 /dev/urandom); "
    'if [ $((r % 100)) -lt "$FAIL_PERCENT" ]; then c=1; else c=0; fi; '
    'echo "exit $c" >> "$f"; exit $c'
)


def task_body(markers, fail_percent, sleep=0.0, max_retries=2, **fields):
    body = {
        "command": TASK_SCRIPT,
        "max_retries": max_retries,
        "requested_resources": {"cores": 1},
        "state": "available",
        "environment": {"M": str(markers), "FAIL_PERCENT": str(fail_percent), "SLEEP": str(sleep)},
    }
    body.update(fields)
    return body


# -- processes ------------------------------------------------------------------


#: The task fields the reliability checks read (`judge`, the counts).
TASK_FIELDS = {
    "state": 1,
    "exit_status": 1,
    "history": 1,
    "continuations": 1,
    "max_retries": 1,
    "max_lost": 1,
    "retry_count": 1,
    "pending_dependency_count": 1,
}


def read_all_tasks(request, projection=None):
    """Every task, by id, read page by page through `request(method, path,
    **kwargs)` (a cluster's or a set of servers')."""
    tasks, page = {}, 1
    while True:
        r = request(
            "GET",
            "/tasks",
            params={
                "max_results": 5000,
                "page": page,
                "projection": json.dumps(projection or TASK_FIELDS),
                "sort": json.dumps([["_created", 1], ["_id", 1]]),
            },
        )
        assert r.status_code == 200, r.text[:2000]
        body = r.json()
        for item in body["_items"]:
            tasks[item["_id"]] = item
        if len(body["_items"]) < 5000:
            return tasks
        page += 1


class Worker:
    """A `banyan-worker` process (optionally wrapped, e.g. by `ip netns exec`)."""

    def __init__(
        self,
        url,
        work_dir,
        log_path,
        cores=2,
        heartbeat=0.5,
        timeout=None,
        prefix=(),
        token=None,
        claim_wait=0.2,
        host=None,
        prefetch=None,
    ):
        self.args = list(prefix) + [
            sys.executable,
            "-m",
            "banyan.worker",
            "--server",
            url,
            "--cores",
            str(cores),
            "--heartbeat",
            str(heartbeat),
            "--work-dir",
            str(work_dir),
            "--claim-wait",
            str(claim_wait),
            "--drain",
            "5",
            "--log-level",
            "INFO",
        ]
        if timeout is not None:
            self.args += ["--timeout", str(timeout)]
        if token:
            self.args += ["--token", token]
        if host:
            self.args += ["--host", host]
        if prefetch:
            self.args += ["--prefetch", str(prefetch)]
        self.log_path = str(log_path)
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self, sig=signal.SIGKILL):
        """Signal the worker process itself (its tasks live in their own sessions)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=15)
            self.log.close()

    def alive(self):
        return self.proc.poll() is None


class Cluster:
    """A live server on `data_dir` and `workers` workers of `cores` slots."""

    def __init__(
        self, tmp_path, workers=4, cores=2, heartbeat_timeout=3.0, server_args=(), worker_args=None, token=None
    ):
        self.tmp = tmp_path
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.server = LiveServer(
            tmp_path / "server-data", ["--heartbeat-timeout", str(heartbeat_timeout)] + list(server_args)
        )
        self.cores = cores
        self.worker_args = dict(worker_args or {})
        self.workers = []
        self.n_workers = workers
        self.http = TestSession()
        if token:
            self.http.headers["Authorization"] = "Bearer " + token

    @property
    def url(self):
        return self.server.url

    def start(self):
        self.server.start()
        for _ in range(self.n_workers):
            self.add_worker()
        return self

    def add_worker(self, **kwargs):
        i = len(self.workers)
        args = dict(self.worker_args, **kwargs)
        args.setdefault("host", "w%d" % i)
        worker = Worker(
            args.pop("url", self.url),
            self.tmp / ("work%d" % i),
            self.tmp / ("worker%d.log" % i),
            cores=self.cores,
            **args,
        ).start()
        self.workers.append(worker)
        return worker

    def stop(self):
        for worker in self.workers:
            worker.stop()
        self.server.stop()
        self.http.close()

    # -- requests (retried across server restarts) --------------------------

    def request(self, method, path, deadline=60, **kwargs):
        """A request that waits out a restarting server (connection errors
        only); any 5xx fails the test."""
        end = time.monotonic() + deadline
        while True:
            try:
                r = self.http.request(method, self.url + path, timeout=30, **kwargs)
            except requests.ConnectionError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
                continue
            assert r.status_code < 500, "%s %s answered %s: %s" % (method, path, r.status_code, r.text[:2000])
            return r

    def submit(self, bodies, batch=200):
        """POST `bodies` in batches; returns their ids in order."""
        ids = []
        for i in range(0, len(bodies), batch):
            chunk = bodies[i : i + batch]
            r = self.request("POST", "/tasks", json=chunk)
            assert r.status_code == 201, r.text[:2000]
            reply = r.json()
            items = reply["_items"] if "_items" in reply else [reply]
            ids += [item["_id"] for item in items]
        return ids

    def all_tasks(self, projection=None):
        return read_all_tasks(self.request, projection)

    def counts(self):
        r = self.request(
            "GET",
            "/tasks",
            params={"max_results": 1, "where": json.dumps({"state": {"$nin": ["terminated", "cancelled"]}})},
        )
        return r.json()["_meta"]["total"]

    def wait_all_finished(self, timeout, poll=0.5, on_poll=None):
        """Wait until no task is left unfinished; returns the seconds it took."""
        started = time.monotonic()
        while True:
            left = self.counts()
            if left == 0:
                return time.monotonic() - started
            if on_poll is not None:
                on_poll(left)
            if time.monotonic() - started > timeout:
                states = {}
                for task in self.all_tasks({"state": 1}).values():
                    states[task["state"]] = states.get(task["state"], 0) + 1
                raise AssertionError("%d tasks still unfinished after %ss: %s" % (left, timeout, states))
            time.sleep(poll)

    def server_log_errors(self):
        return self.server.server_errors()


# -- graphs -----------------------------------------------------------------------


def graph_bodies(markers, count, fail_percent, rng, sleep=0.0, max_retries=2, graph_share=0.5):
    """`count` task bodies in submission order: independent tasks and small
    graphs (chains and diamonds of continuations). Returns (levels,
    parents): `levels` is a list of lists of (key, body) to submit level by
    level, children first (a continuation must exist before its parent names
    it); `parents[key]` lists the keys of a task's parents. Continuations are
    given as keys and replaced by ids at submission."""
    keys = []
    parents = {}
    depth = {}
    bodies = {}
    n = 0
    while n < count:
        shape = rng.random()
        if shape >= graph_share or count - n < 4:
            key = "t%d" % n
            bodies[key], depth[key], parents[key] = task_body(markers, fail_percent, sleep, max_retries), 0, []
            keys.append(key)
            n += 1
        elif shape < graph_share / 2:
            # a chain of 3: a -> b -> c
            a, b, c = ("t%d" % (n + i) for i in range(3))
            for k in (a, b, c):
                bodies[k] = task_body(markers, fail_percent, sleep, max_retries)
            bodies[a]["continuations"], bodies[b]["continuations"] = [b], [c]
            parents.update({a: [], b: [a], c: [b]})
            depth.update({a: 2, b: 1, c: 0})
            keys += [a, b, c]
            n += 3
        else:
            # a diamond: a -> (b, c) -> d
            a, b, c, d = ("t%d" % (n + i) for i in range(4))
            for k in (a, b, c, d):
                bodies[k] = task_body(markers, fail_percent, sleep, max_retries)
            bodies[a]["continuations"] = [b, c]
            bodies[b]["continuations"] = bodies[c]["continuations"] = [d]
            parents.update({a: [], b: [a], c: [a], d: [b, c]})
            depth.update({a: 2, b: 1, c: 1, d: 0})
            keys += [a, b, c, d]
            n += 4
    for key in keys:
        # roots are submitted available; continuations wait inactive
        bodies[key]["state"] = "inactive" if parents[key] else "available"
        bodies[key]["name"] = key
    levels = [[(k, bodies[k]) for k in keys if depth[k] == level] for level in range(3)]
    return levels, parents


def submit_graph(cluster, levels, chunk=None):
    """Submit level by level (children first), `chunk` tasks to a
    `cluster.submit` (a whole level by default); returns {key: task id}."""
    ids = {}
    for level in levels:
        step = chunk or max(1, len(level))
        for start in range(0, len(level), step):
            part = level[start : start + step]
            bodies = []
            for _key, body in part:
                body = dict(body)
                if "continuations" in body:
                    body["continuations"] = [ids[k] for k in body["continuations"]]
                bodies.append(body)
            for (key, _), id_ in zip(part, cluster.submit(bodies)):
                ids[key] = id_
    return ids


# -- markers and the rules ---------------------------------------------------------


def read_markers(markers):
    """{task id: {attempt: exit code or None (started, never ended)}} and
    the list of duplicate runs the commands recorded."""
    runs = {}
    for name in os.listdir(markers):
        if name == "DUPLICATES":
            continue
        task_id, attempt = name.rsplit(".", 1)
        with open(os.path.join(markers, name)) as f:
            lines = f.read().split("\n")
        code = None
        for line in lines:
            if line.startswith("exit "):
                code = int(line.split()[1])
        runs.setdefault(task_id, {})[int(attempt)] = code
    dup_path = os.path.join(markers, "DUPLICATES")
    duplicates = open(dup_path).read().split() if os.path.exists(dup_path) else []
    return runs, duplicates


def expected_states(tasks, runs, parents_of):
    """What the rules say each task ends as, from the attempts that ran
    (`runs`: the markers) and the graph: {task id: (state, exit status)}.

    - a task with a parent that did not succeed never runs: cancelled;
    - otherwise it succeeded if one of its attempts exited 0 (and that
      attempt was the last); it failed if all max_retries + 1 ran and failed.
    """
    expected = {}

    def outcome(task_id):
        if task_id in expected:
            return expected[task_id]
        for parent in parents_of.get(task_id, []):
            if outcome(parent) != ("terminated", "success"):
                expected[task_id] = ("cancelled", "cancelled")
                return expected[task_id]
        attempts = runs.get(task_id, {})
        codes = [attempts[a] for a in sorted(attempts)]
        if 0 in codes:
            expected[task_id] = ("terminated", "success")
        elif len(codes) == tasks[task_id]["max_retries"] + 1:
            expected[task_id] = ("terminated", "failure")
        else:
            expected[task_id] = ("?", "attempts %s" % codes)
        return expected[task_id]

    for task_id in tasks:
        outcome(task_id)
    return expected


def check_against_rules(tasks, runs, duplicates, parents_of, strict=True):
    """Every way the end state can break the rules, as a list of messages
    (empty when all is well). `strict`: every attempt the server recorded
    ran to the end and reported (no faults were injected)."""
    problems = ["attempt ran twice: %s" % d for d in duplicates]
    expected = expected_states(tasks, runs, parents_of)
    for task_id, task in tasks.items():
        history = task.get("history") or []
        attempts = runs.get(task_id, {})
        got = (task["state"], task.get("exit_status"))
        if got[0] not in ("terminated", "cancelled"):
            problems.append("%s did not end: %s" % (task_id, got))
            continue
        recorded = [h["attempt"] for h in history]
        if recorded != list(range(1, len(history) + 1)):
            problems.append("%s: attempts recorded out of order: %s" % (task_id, recorded))
        if not set(attempts) <= set(recorded):
            problems.append(
                "%s: attempts %s ran but the server recorded only %s" % (task_id, sorted(attempts), recorded)
            )
        successes = [h["attempt"] for h in history if h.get("exit_status") == "success"]
        if len(successes) > 1 or (successes and successes[-1] != len(history)):
            problems.append(
                "%s finished with success more than once or then ran again: %s"
                % (task_id, [(h["attempt"], h.get("exit_status")) for h in history])
            )
        if strict:
            if sorted(attempts) != recorded:
                problems.append("%s: attempts that ran %s != recorded %s" % (task_id, sorted(attempts), recorded))
            for h in history:
                code = attempts.get(h["attempt"])
                if code is None or h.get("exit_code") != code:
                    problems.append(
                        "%s attempt %s: exit code %s recorded, %s left by the command"
                        % (task_id, h["attempt"], h.get("exit_code"), code)
                    )
            if got != expected[task_id]:
                problems.append(
                    "%s ended %s; the rules say %s (attempts %s)" % (task_id, got, expected[task_id], attempts)
                )
        else:
            # Faults: an attempt may have been abandoned (worker lost), so
            # the server's own record of each attempt decides.
            statuses = [h.get("exit_status") for h in history]
            parent_ok = all(
                (tasks[p]["state"], tasks[p].get("exit_status")) == ("terminated", "success")
                for p in parents_of.get(task_id, [])
            )
            if not parent_ok:
                if got != ("cancelled", "cancelled") or history:
                    problems.append(
                        "%s has a parent that did not succeed but ended %s after %d attempts"
                        % (task_id, got, len(history))
                    )
            elif "success" in statuses:
                if got != ("terminated", "success"):
                    problems.append("%s had a successful attempt but ended %s" % (task_id, got))
            elif got[0] != "terminated" or (
                sum(1 for s in statuses if s != "abandoned (worker unreachable)") != task["max_retries"] + 1
                and statuses.count("abandoned (worker unreachable)") <= task.get("max_lost", 3)
            ):
                # attempts lost with their worker count against max_lost, not max_retries
                problems.append(
                    "%s: attempts %s, ended %s; the rules say failed after %d attempts (and at "
                    "most %d lost)" % (task_id, statuses, got, task["max_retries"] + 1, task.get("max_lost", 3))
                )
            for h in history:
                code = attempts.get(h["attempt"])
                if h.get("exit_status") in ("success", "failure") and code is not None and h.get("exit_code") != code:
                    problems.append(
                        "%s attempt %s: exit code %s recorded, %s left by the command"
                        % (task_id, h["attempt"], h.get("exit_code"), code)
                    )
    return problems


def parents_by_id(ids, parents):
    return {ids[k]: [ids[p] for p in ps] for k, ps in parents.items()}


def judge(markers, tasks, acknowledged, parents_of, strict=True):
    """A finished run judged: (runs, duplicates, lost, problems), i.e. the
    markers read (see `read_markers`), the acknowledged task ids the server
    no longer holds, and every rule broken (see `check_against_rules`)."""
    runs, duplicates = read_markers(markers)
    lost = sorted(set(acknowledged) - set(tasks))
    problems = check_against_rules(tasks, runs, duplicates, parents_of, strict=strict)
    return runs, duplicates, lost, problems


# -- the report table ----------------------------------------------------------------

_figures_lock = threading.Lock()


def record(section, **figures):
    """Add this run's figures for `section` to test-output/reliability.json
    and rewrite the table in test-output/reliability.md."""
    os.makedirs(OUTPUT, exist_ok=True)
    with _figures_lock:
        try:
            with open(FIGURES) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data[section] = dict(figures, recorded=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(FIGURES, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        with open(TABLE, "w") as f:
            f.write(render_table(data))


def report(section, lost, duplicates, problems, **figures):
    """Record a run's figures under `section` (whatever its outcome), then
    fail the test if a task was lost or a rule broken."""
    record(section, lost=len(lost), duplicates=len(duplicates), violations=len(problems), **figures)
    assert lost == []
    assert problems == [], "\n".join(problems[:50])


def render_table(data):
    lines = [
        "| run | load held | faults injected | tasks lost | duplicate runs | other rule violations "
        "| requests fuzzed | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for section in sorted(data):
        d = data[section]
        lines.append(
            "| %s | %s | %s | %s | %s | %s | %s | %s |"
            % (
                section,
                d.get("load", "-"),
                d.get("faults", "-"),
                d.get("lost", "-"),
                d.get("duplicates", "-"),
                d.get("violations", "-"),
                d.get("fuzzed", "-"),
                ("%.0f s" % d["seconds"]) if "seconds" in d else "-",
            )
        )
    return "\n".join(lines) + "\n"
