"""The `banyan` command as a user runs it: the real executable, a live
server and a real `banyan-worker`, with what it prints checked against what
the HTTP API holds."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime

import pytest
from conftest import TEST_TOKEN, CheckedSession, LiveServer, stop_process, wait_for

BIN = os.path.dirname(sys.executable)
BANYAN = (
    [os.path.join(BIN, "banyan")]
    if os.path.exists(os.path.join(BIN, "banyan"))
    else [sys.executable, "-m", "banyan.cli"]
)
WORKER = (
    [os.path.join(BIN, "banyan-worker")]
    if os.path.exists(os.path.join(BIN, "banyan-worker"))
    else [sys.executable, "-m", "banyan.worker"]
)

COMMANDS = [
    "submit",
    "ls",
    "show",
    "cancel",
    "wait",
    "logs",
    "stats",
    "workers",
    "progress",
    "token",
    "server",
    "up",
    "jobs",
    "retry",
    "hold",
    "release",
]


class Cluster:
    """A live server and one worker, shared by the tests of this module."""

    def __init__(self, base, heartbeat=1):
        self.base = base
        self.server = LiveServer(base / "server-data").start()
        self.url = self.server.url
        self.http = CheckedSession()
        self.home = base / "home"
        self.home.mkdir()
        self.worker_log = open(base / "worker.log", "wb")
        # Cores beyond the machine's: the tasks here sleep or echo, and the
        # worker should take a whole array in one claim.
        self.worker = subprocess.Popen(
            WORKER
            + [
                "--server",
                self.url,
                "--cores",
                "16",
                "--memory",
                "4 GiB",
                "--heartbeat",
                str(heartbeat),
                "--work-dir",
                str(base / "work"),
                "--claim-wait",
                "5",
                "--drain",
                "5",
            ],
            stdout=self.worker_log,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        self.worker_id = wait_for(self._active_worker, 30, "the worker to register")

    def _active_worker(self):
        workers = self.http.get(self.url + "/workers", params={"state": "active"}).json()["_items"]
        return workers[0]["_id"] if workers else None

    def env(self, **extra):
        """The environment of a user of this cluster (no config of the real user's)."""
        env = {k: v for k, v in os.environ.items() if k not in ("BANYAN_TOKEN", "BANYAN_CONFIG", "XDG_CONFIG_HOME")}
        env.update(HOME=str(self.home), BANYAN_SERVER=self.url, BANYAN_TOKEN=TEST_TOKEN)
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def run(self, *args, env=None, input=None, timeout=60):
        return subprocess.run(
            BANYAN + [str(a) for a in args],
            capture_output=True,
            text=True,
            input=input,
            env=env or self.env(),
            timeout=timeout,
        )

    def ok(self, *args, **kw):
        result = self.run(*args, **kw)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result

    def task(self, task_id):
        return self.http.get("%s/tasks/%s" % (self.url, task_id)).json()

    def tasks(self, where):
        return self.http.get(self.url + "/tasks", params={"where": json.dumps(where)}).json()["_items"]

    def close(self):
        stop_process(self.worker, timeout=20)
        self.worker_log.close()
        self.http.close()
        self.server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from shared(Cluster(tmp_path_factory.mktemp("cli")))


def shared(cluster):
    """The body of a module's `cluster` fixture: the tests get `cluster`;
    then it is closed, and its server must have logged no error."""
    yield cluster
    cluster.close()
    assert cluster.server.server_errors() == []


def banyan(cluster, *args, cwd=None, env=None, ok=True, timeout=120):
    """Run `banyan ARGS` as a user of `cluster` (`env` added to their
    environment); it must not crash, and with `ok` must exit 0."""
    result = subprocess.run(
        BANYAN + [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cluster.env(**(env or {})),
        timeout=timeout,
    )
    assert "Traceback" not in result.stderr, result.stderr
    if ok:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def unique(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def when(value):
    """An API time (ISO 8601, UTC) as a datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- help and errors ------------------------------------------------------------------


@pytest.mark.slow
def test_every_command_answers_help():
    invocations = [[]] + [[c] for c in COMMANDS] + [["token", a] for a in ("create", "revoke", "list")]
    procs = [
        (args, subprocess.Popen(BANYAN + args + ["--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for args in invocations
    ]
    for args, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (args, err)
        assert out.startswith("usage: banyan" + "".join(" " + a for a in args)), out
        # a description beyond the usage line
        assert len([line for line in out.splitlines() if line.strip()]) > 4, out
        if not args:
            for command in COMMANDS:
                assert "\n    %s " % command in out, command


def test_the_command_loads_nothing_of_the_server():
    # `banyan --help` and the parser of every command: no server library,
    # no HTTP library (a command that talks to a server loads `requests` then).
    probe = (
        "import sys, banyan.cli\n"
        "banyan.cli.build_parser()\n"
        "print(' '.join(m for m in ('eve', 'flask', 'werkzeug', 'pymongo', 'mongomock', 'cerberus', "
        "'waitress', 'requests', 'banyan.server.auth', 'banyan.server.app') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.slow
def test_unreachable_server_gives_one_line_and_a_nonzero_exit(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = "http://127.0.0.1:%d" % s.getsockname()[1]
    some_id = "0123456789abcdef01234567"
    invocations = [
        ["ls"],
        ["show", some_id],
        ["submit", "--", "true"],
        ["wait", some_id],
        ["cancel", some_id],
        ["logs", some_id],
        ["stats"],
        ["workers"],
        ["submit", "--array", "1-3", "--", "true"],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANYAN_")}
    env.update(HOME=str(tmp_path), BANYAN_SERVER=dead)
    procs = []
    for args in invocations:
        # the server given by flag for some, by the environment for the others
        argv = BANYAN + args[:1] + (["--server", dead] if len(procs) % 2 else []) + args[1:]
        procs.append((args, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
    for args, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, (args, out, err)
        line = one_line(err)
        assert "cannot reach" in line and dead in line, line
        assert out == ""


@pytest.mark.slow
def test_refused_input_gives_one_line(cluster, tmp_path):
    name = unique("refused")
    result = cluster.run("submit", "--name", name, "--memory", "lots", "--", "true")
    assert result.returncode == 2
    assert "'lots'" in one_line(result.stderr)

    missing = "0123456789abcdef01234567"
    result = cluster.run("submit", "--name", name, "--after", missing, "--", "true")
    assert result.returncode != 0
    assert missing in one_line(result.stderr)

    graph = tmp_path / "cycle.yaml"
    graph.write_text("tasks:\n  - {name: a, command: 'true', after: [b]}\n  - {name: b, command: 'true', after: [a]}\n")
    result = cluster.run("submit", "--file", graph)
    assert result.returncode == 2
    assert "cycle" in one_line(result.stderr)

    result = cluster.run("ls", "--where", "{not json")
    assert result.returncode == 2
    assert "--where" in one_line(result.stderr)

    result = cluster.run("submit", "--name", name, "--no-such-flag", "--", "true")
    assert result.returncode == 2
    assert "--no-such-flag" in one_line(result.stderr)

    result = cluster.run("submit", "--name", name, "--cores", "inf", "--", "true")
    assert result.returncode == 2
    assert "'inf'" in one_line(result.stderr)

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"tasks:\n  - {name: \xff\xfe}\n")
    result = cluster.run("submit", "--file", binary)
    assert result.returncode == 2
    assert "UTF-8" in one_line(result.stderr)

    with socket.socket() as taken:  # a port in use: one line, no traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cluster.run("server", "--port", str(taken.getsockname()[1]), "--data-dir", tmp_path / "other")
    assert result.returncode != 0
    assert "in use" in one_line(result.stderr).lower() or "address" in one_line(result.stderr).lower()

    assert cluster.tasks({"name": name}) == []  # nothing of it reached the queue


# -- graphs and wait -------------------------------------------------------------------


@pytest.mark.slow
def test_graph_from_a_file_runs_in_dependency_order_and_wait_exits_0(cluster, tmp_path):
    order = tmp_path / "order.txt"
    step = "echo start {n} >> %s; sleep {s}; echo end {n} >> %s" % (order, order)
    graph = tmp_path / "graph.yaml"
    graph.write_text(
        """
defaults:
  cores: 0.5
tasks:
  - name: prep
    command: "%s"
    continuations: [left, right]
  - name: left
    command: "%s"
  - name: right
    command: "%s"
  - name: join
    command: "%s"
    after: [left, right]
"""
        % (
            step.format(n="prep", s=1.2),
            step.format(n="left", s=0.2),
            step.format(n="right", s=1.1),
            step.format(n="join", s=0),
        )
    )
    submitted = cluster.ok("submit", "--file", graph)
    ids = dict(reversed(line.split()) for line in submitted.stdout.splitlines())
    assert sorted(ids) == ["join", "left", "prep", "right"]

    waited = cluster.ok("wait", *ids.values())
    assert "all 4 tasks succeeded" in waited.stderr

    tasks = {name: cluster.task(task_id) for name, task_id in ids.items()}
    assert set(tasks["prep"]["continuations"]) == {ids["left"], ids["right"]}
    assert set(tasks["left"]["continuations"]) == set(tasks["right"]["continuations"]) == {ids["join"]}
    for task in tasks.values():
        assert (task["state"], task["exit_status"]) == ("terminated", "success")
        assert task["requested_resources"]["cores"] == 0.5
    for parent, child in [("prep", "left"), ("prep", "right"), ("left", "join"), ("right", "join")]:
        assert when(tasks[child]["history"][0]["started"]) >= when(tasks[parent]["history"][-1]["ended"])
    lines = order.read_text().split("\n")
    for parent, child in [("prep", "left"), ("prep", "right"), ("left", "join"), ("right", "join")]:
        assert lines.index("end " + parent) < lines.index("start " + child), lines


@pytest.mark.slow
def test_wait_exits_nonzero_and_names_the_failed_tasks(cluster, tmp_path):
    tag = unique("g")
    graph = tmp_path / "failing.yaml"
    graph.write_text(
        """
tasks:
  %(t)s-fine: {command: "true"}
  %(t)s-doomed: {command: "exit 3", continuations: [%(t)s-never]}
  %(t)s-never: {command: "echo unreachable"}
"""
        % {"t": tag}
    )
    ids = dict(reversed(line.split()) for line in cluster.ok("submit", "--file", graph).stdout.splitlines())
    result = cluster.run("wait", *ids.values())
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    named = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(named) == 2, result.stderr
    doomed = next(line for line in named if ids[tag + "-doomed"] in line)
    assert tag + "-doomed" in doomed and "failure" in doomed and "exit code 3" in doomed
    never = next(line for line in named if ids[tag + "-never"] in line)
    assert "cancelled" in never
    assert ids[tag + "-fine"] not in result.stderr
    assert cluster.task(ids[tag + "-never"])["state"] == "cancelled"
    assert cluster.task(ids[tag + "-doomed"])["history"][0]["exit_code"] == 3
    # the same tasks chosen by name
    assert cluster.run("wait", "--name", tag + "-fine").returncode == 0
    assert cluster.run("wait", "--name", tag + "-doomed").returncode == 1


@pytest.mark.slow
def test_after_runs_once_the_parent_succeeded_and_is_refused_after_a_failure(cluster):
    parent = cluster.ok("submit", "--", "sleep 1").stdout.strip()
    child = cluster.ok("submit", "--after", parent, "--", "echo", "child ran").stdout.strip()
    cluster.ok("wait", "-", input=child + "\n")
    parent_doc, child_doc = cluster.task(parent), cluster.task(child)
    assert parent_doc["continuations"] == [child]
    assert when(child_doc["history"][0]["started"]) >= when(parent_doc["history"][-1]["ended"])
    # a parent that already succeeded: its new continuation runs at once
    late = cluster.ok("submit", "--after", parent, "--", "echo", "late").stdout.strip()
    cluster.ok("wait", late)
    assert cluster.ok("logs", late).stdout == "late\n"

    failed = cluster.ok("submit", "--", "exit 1").stdout.strip()
    assert cluster.run("wait", failed).returncode == 1
    name = unique("orphan")
    result = cluster.run("submit", "--name", name, "--after", failed, "--", "true")
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert failed in line and "failure" in line
    assert cluster.tasks({"name": name}) == []


@pytest.mark.slow
def test_array_sets_the_index_and_logs_print_what_the_api_holds(cluster):
    name = unique("arr")
    result = cluster.ok(
        "submit",
        "--array",
        "1-5",
        "--name",
        name,
        "--",
        "echo index=$BANYAN_ARRAY_INDEX; echo err-$BANYAN_ARRAY_INDEX >&2",
    )
    ids = result.stdout.split()
    assert len(ids) == 5
    cluster.ok("wait", "-", input=result.stdout)
    seen = set()
    for task_id in ids:
        task = cluster.task(task_id)
        assert task["name"] == name
        index = task["environment"]["BANYAN_ARRAY_INDEX"]
        seen.add(index)
        api = cluster.http.get("%s/tasks/%s/logs" % (cluster.url, task_id)).json()
        assert api["stdout"] == "index=%s\n" % index and api["stderr"] == "err-%s\n" % index
        logs = cluster.ok("logs", task_id)
        assert (logs.stdout, logs.stderr) == (api["stdout"], api["stderr"])
    assert seen == {"1", "2", "3", "4", "5"}
    assert cluster.ok("logs", "--attempt", "1", ids[0]).stdout == cluster.ok("logs", ids[0]).stdout
    result = cluster.run("logs", "--attempt", "2", ids[0])
    assert result.returncode == 1 and "attempt 2" in one_line(result.stderr)


@pytest.mark.slow
def test_logs_follow_prints_the_output_once_the_task_ends(cluster):
    task_id = cluster.ok("submit", "--", "echo first; sleep 1; echo second").stdout.strip()
    result = cluster.ok("logs", "--follow", task_id)
    assert result.stdout == "first\nsecond\n"
    assert cluster.task(task_id)["state"] == "terminated"


# -- ls, show, cancel, stats, workers ----------------------------------------------------------


@pytest.mark.slow
def test_ls_and_show_print_what_the_api_holds(cluster):
    name = unique("ls")
    ids = cluster.ok(
        "submit",
        "--array",
        "1-3",
        "--name",
        name,
        "--cores",
        "0.5",
        "--memory",
        "1 MiB",
        "--priority",
        "3",
        "--",
        "true",
    ).stdout.split()
    cluster.ok("wait", *ids)
    api = {t["_id"]: t for t in cluster.tasks({"name": name})}
    assert set(api) == set(ids)

    listed = json.loads(cluster.ok("ls", "--json", "--name", name).stdout)
    assert [t["_id"] for t in listed] == ids
    for task in listed:
        expected = dict(api[task["_id"]])
        expected.pop("_links", None)
        assert task == expected

    rows = cluster.ok("ls", "--name", name).stdout.splitlines()
    assert rows[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert len(rows) == 4
    for row, task_id in zip(rows[1:], ids):
        cells = row.split()
        task = api[task_id]
        assert cells[0] == task_id
        assert cells[1] == "%s[%s]" % (name, task["environment"]["BANYAN_ARRAY_INDEX"])
        assert cells[2] == task["exit_status"] == "success"
        assert task["owner"] in cells and "0.5" in cells
    assert cluster.ok("ls", "--name", name, "--state", "running").stdout == ""
    assert len(cluster.ok("ls", "--name", name, "--state", "finished").stdout.splitlines()) == 4

    task = api[ids[0]]
    shown = cluster.ok("show", ids[0]).stdout
    attempt = task["history"][0]
    for text in (ids[0], name, "terminated", "success", "cores 0.5", "1.0 MiB", attempt["worker"], attempt["host"]):
        assert text in shown, (text, shown)
    shown_json = json.loads(cluster.ok("show", "--json", ids[0]).stdout)
    assert shown_json == {k: v for k, v in cluster.task(ids[0]).items() if k != "_links"}


@pytest.mark.slow
def test_cancel_stops_a_running_task_and_its_continuations(cluster):
    sleeper = cluster.ok("submit", "--name", "sleeper", "--", "sleep", "60").stdout.strip()
    after = cluster.ok("submit", "--after", sleeper, "--", "echo", "never").stdout.strip()
    wait_for(lambda: cluster.task(sleeper)["state"] == "running", 30, "the sleeper to start")

    result = cluster.ok("cancel", sleeper)
    assert sleeper in result.stdout
    wait_for(lambda: cluster.task(sleeper)["state"] == "cancelled", 30, "the sleeper to be stopped")
    # (on a database, the cascade is a write after the sleeper's own)
    wait_for(lambda: cluster.task(after)["state"] == "cancelled", 30, "its continuation to be cancelled")
    assert cluster.task(sleeper)["history"][-1]["exit_status"] == "cancelled"

    again = cluster.run("cancel", sleeper)
    assert again.returncode == 1
    assert "already finished" in one_line(again.stderr)

    # by filter: only the matching, unfinished tasks
    blocker = cluster.ok("submit", "--", "sleep", "60").stdout.strip()
    name = unique("held")
    held = cluster.ok("submit", "--array", "1-2", "--name", name, "--after", blocker, "--", "true").stdout.split()
    result = cluster.ok("cancel", "--where", json.dumps({"name": name}))
    assert sorted(line.split()[0] for line in result.stdout.splitlines()) == sorted(held)
    assert {cluster.task(t)["state"] for t in held} == {"cancelled"}
    assert cluster.task(blocker)["state"] in ("available", "running")
    cluster.ok("cancel", blocker)


def _stable(read_api, read_cli, tries=20):
    """(api, cli) read while nothing changed in between."""
    for _ in range(tries):
        before = read_api()
        cli = read_cli()
        if read_api() == before:
            return before, cli
        time.sleep(0.2)
    raise AssertionError("the queue kept changing")


@pytest.mark.slow
def test_stats_and_workers_print_what_the_api_holds(cluster):
    counts = ("total", "states", "outcomes", "succeeded", "failed")

    def api_stats():
        stats = cluster.http.get(cluster.url + "/stats").json()
        return {key: stats[key] for key in counts}

    api, cli = _stable(api_stats, lambda: json.loads(cluster.ok("stats", "--json").stdout))
    assert {key: cli[key] for key in counts} == api
    assert set(cli) >= {"attempts", "queue_wait", "throughput"}
    api, text = _stable(api_stats, lambda: cluster.ok("stats").stdout)
    first = text.splitlines()[0].split()
    assert first[:2] == ["tasks", str(api["total"])]
    assert "terminated %d" % api["states"]["terminated"] in text
    assert "success %d" % api["outcomes"]["success"] in text

    api_workers = [w for w in cluster.http.get(cluster.url + "/workers").json()["_items"] if w["state"] != "stopped"]
    cli_workers = json.loads(cluster.ok("workers", "--json").stdout)
    assert [w["_id"] for w in cli_workers] == [w["_id"] for w in api_workers]
    for mine, theirs in zip(cli_workers, api_workers):
        assert {k: mine[k] for k in ("host", "state", "resources")} == {
            k: theirs[k] for k in ("host", "state", "resources")
        }
    table = cluster.ok("workers").stdout.splitlines()
    row = next(line for line in table if line.startswith(cluster.worker_id))
    worker = next(w for w in api_workers if w["_id"] == cluster.worker_id)
    assert row.split()[1:3] == [worker["host"], "active"]
    assert "/16" in row and "/4.0 GiB" in row


@pytest.mark.slow
def test_server_and_token_come_from_flag_then_environment_then_config_file(cluster, tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "banyan").mkdir(parents=True)
    (home / ".config" / "banyan" / "config.toml").write_text('server = "%s"\n' % cluster.url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = "http://127.0.0.1:%d" % s.getsockname()[1]
    from_file = cluster.env(HOME=str(home), BANYAN_SERVER=None)
    assert cluster.run("workers", env=from_file).returncode == 0
    env_wins = cluster.env(HOME=str(home), BANYAN_SERVER=dead)
    result = cluster.run("workers", env=env_wins)
    assert result.returncode == 3 and dead in one_line(result.stderr)
    assert cluster.run("workers", "--server", cluster.url, env=env_wins).returncode == 0

    (home / ".config" / "banyan" / "config.toml").write_text("server = [not toml\n")
    result = cluster.run("workers", env=from_file)
    assert result.returncode == 2 and "config.toml" in one_line(result.stderr)


@pytest.mark.slow
def test_progress_reports_from_inside_a_task(cluster):
    banyan = " ".join(BANYAN)
    # The task runs until cancelled: the checks below take what time they take.
    task_id = cluster.ok("submit", "--", "%s progress 0.5 half way && sleep 600" % banyan).stdout.strip()

    def progress():
        attempt = (cluster.task(task_id).get("history") or [{}])[-1]
        return attempt.get("progress")

    reported = wait_for(progress, 30, "a progress report")
    assert (reported["fraction"], reported["message"]) == (0.5, "half way")
    assert "50% half way" in cluster.ok("show", task_id).stdout
    cluster.ok("cancel", task_id)
    outside = cluster.run("progress", "0.5")
    assert outside.returncode == 1 and "BANYAN_PROGRESS_FILE" in one_line(outside.stderr)


# -- banyan up with authentication --------------------------------------------------------------


@pytest.mark.slow
def test_up_with_auth_gives_its_worker_a_token(tmp_path):
    data = tmp_path / "up-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANYAN_")}
    env["HOME"] = str(tmp_path)
    up = subprocess.Popen(
        BANYAN + ["up", "--auth", "--port", "0", "--data-dir", str(data), "--cores", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        url = up.stdout.readline().split("listening on ")[1].split()[0]
        admin = (data / "admin.token").read_text().strip()
        user = subprocess.run(
            BANYAN + ["token", "create", "--role", "user", "--name", "alice", "--server", url, "--token", admin],
            capture_output=True,
            text=True,
            env=env,
        )
        assert user.returncode == 0, user.stderr
        env["BANYAN_TOKEN"] = user.stdout.strip()
        submitted = subprocess.run(
            BANYAN + ["submit", "--server", url, "--wait", "--", "echo", "authenticated"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr
        task_id = submitted.stdout.split()[0]
        logs = subprocess.run(BANYAN + ["logs", "--server", url, task_id], capture_output=True, text=True, env=env)
        assert logs.stdout == "authenticated\n"
        no_token = subprocess.run(
            BANYAN + ["ls", "--server", url, "--token", "byn_wrong"], capture_output=True, text=True, env=env
        )
        assert no_token.returncode == 1 and "401" in one_line(no_token.stderr)
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0


@pytest.mark.slow
def test_wait_on_a_filter_keeps_waiting_for_tasks_that_left_it(live_server):
    """`wait --where '{"state": "available"}'` over more than 200 tasks asks
    the filter again each round; tasks claimed meanwhile no longer match it
    but have not finished, and `wait` must not call them done."""
    from banyan.client import Client
    from banyan.waiting import wait_for

    client = Client(live_server.url, token=TEST_TOKEN)
    ids = client.create_tasks([{"command": "x", "state": "available", "name": "w"} for _ in range(250)])
    wid = client.register_worker("claimer", {"cores": 1000, "memory": 1 << 40, "gpus": 0})
    claimed = []

    def claim_all(progress):
        if not claimed:
            claimed.extend(client.claim(wid, {"cores": 1000, "memory": 1 << 40, "gpus": 0}, 1000)["_items"])

    result = wait_for(client, where={"state": "available"}, interval=0.05, timeout=1.5, on_progress=claim_all)
    assert len(claimed) == 250 and len(ids) == 250
    assert result.timed_out and not result.ok


@pytest.mark.slow
def test_ctrl_c_on_up_lets_running_tasks_finish_and_report(tmp_path):
    """Ctrl-C reaches the whole foreground group. `up` alone must act on
    it: the worker drains (its task ends and is reported) and unregisters,
    then the server stops."""
    data = tmp_path / "up-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANYAN_")}
    env["HOME"] = str(tmp_path)
    up = subprocess.Popen(
        BANYAN + ["up", "--port", "0", "--data-dir", str(data), "--cores", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        url = up.stdout.readline().split("listening on ")[1].split()[0]
        marker = tmp_path / "started"
        submitted = subprocess.run(
            BANYAN + ["submit", "--server", url, "--", "sh", "-c", "touch %s; sleep 2; echo finished" % marker],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert submitted.returncode == 0, submitted.stderr
        task_id = submitted.stdout.split()[0]
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C does
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    server = LiveServer(data, embedded=True).start()  # the store `up` wrote
    try:
        http = CheckedSession()
        task = http.get(server.url + "/tasks/" + task_id).json()
        assert task["state"] == "terminated" and task["exit_status"] == "success", task
        logs = http.get(server.url + "/tasks/%s/logs" % task_id).json()
        assert logs["stdout"] == "finished\n"
        workers = http.get(server.url + "/workers").json()["_items"]
        assert [w["state"] for w in workers] == ["stopped"]
    finally:
        server.stop()


def test_retry_memory_factor_from_a_flag_and_a_graph_file(tmp_path):
    from banyan.cli import build_parser
    from banyan.commands.submit import build_graph
    from banyan.graph import GraphError, task_document

    args = build_parser().parse_args(["submit", "--memory", "1 GiB", "--retry-memory-factor", "1.5", "--", "true"])
    [doc] = build_graph(args).docs.values()
    assert doc["retry_memory_factor"] == 1.5 and doc["requested_resources"]["memory"] == 1 << 30
    assert task_document({"command": "x", "retry_memory_factor": 2})["retry_memory_factor"] == 2
    for bad in (0.5, "two", 4096):
        with pytest.raises(GraphError, match="retry.memory.factor"):
            task_document({"command": "x", "retry_memory_factor": bad})


def test_max_lost_from_a_flag_and_a_graph_file():
    from banyan.cli import build_parser
    from banyan.commands.submit import build_graph
    from banyan.graph import GraphError, task_document

    args = build_parser().parse_args(["submit", "--max-lost", "0", "--retries", "2", "--", "true"])
    [doc] = build_graph(args).docs.values()
    assert (doc["max_lost"], doc["max_retries"]) == (0, 2)
    [doc] = build_graph(build_parser().parse_args(["submit", "--", "true"])).docs.values()
    assert "max_lost" not in doc  # the server's default (3)
    assert task_document({"command": "x", "max_lost": 5})["max_lost"] == 5
    for bad in (-1, "two", 1.5):
        with pytest.raises(GraphError, match="max.lost"):
            task_document({"command": "x", "max_lost": bad})
