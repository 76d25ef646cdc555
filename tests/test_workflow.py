"""Issue 17 as a user meets it, through the real `banyan` command against a
live server and a real worker: dependency kinds, jobs, retry, submit
defaults (directory, environment), pending reasons, hold and release,
priorities changed while queued, array limits."""

import json
import subprocess
import threading

import pytest
from conftest import wait_for
from test_cli import BANYAN, Cluster, banyan, shared, unique, when

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A slower heartbeat than test_cli's: these tests run a dozen tasks at
    # once, and a loaded store must not make the worker look lost.
    yield from shared(Cluster(tmp_path_factory.mktemp("workflow"), heartbeat=3))


def submitted_job(result):
    """The job id `submit` names on stderr ("job ID NAME: N tasks")."""
    line = next(line for line in result.stderr.splitlines() if line.startswith("job "))
    return line.split()[1]


def job_line(cluster, job):
    rows = banyan(cluster, "jobs").stdout.splitlines()
    header = rows[0].split()
    row = next(r.split() for r in rows if r.startswith(job))
    return dict(zip(header, row))


def sweep_graph(points, work):
    """Ten points (those listed in `bad` fail), a reduce after all of them
    whatever their outcome, a cleanup after point 3's failure, and a report
    that needs point 3's success."""
    tasks = [{"name": "p%d" % i, "command": "sh ./point.sh %d" % i} for i in range(1, points + 1)]
    tasks.append(
        {
            "name": "reduce",
            "command": "cat out.* | wc -l > count",
            "after_any": ["p%d" % i for i in range(1, points + 1)],
        }
    )
    tasks.append({"name": "cleanup", "command": "echo cleaned > cleaned", "after_failure": ["p3"]})
    tasks.append({"name": "report", "command": "echo reported > reported", "after": ["p3"]})
    (work / "point.sh").write_text('if grep -qw "$1" bad; then exit 2; fi; echo "$1" > "out.$1"\n')
    (work / "graph.yaml").write_text(json.dumps({"tasks": tasks}))


def test_dependency_kinds_and_retry_of_a_failed_sweep(cluster, tmp_path):
    work = tmp_path / "sweep"
    work.mkdir()
    (work / "bad").write_text("3 7\n")
    sweep_graph(10, work)
    result = banyan(cluster, "submit", "--file", "graph.yaml", "--job-name", unique("sweep"), cwd=work)
    ids = dict(reversed(line.split()) for line in result.stdout.splitlines())
    job = submitted_job(result)

    waited = banyan(cluster, "wait", "--job", job, ok=False)
    assert waited.returncode == 1, waited.stderr
    # the reduce ran after all ten, and saw the eight outputs
    assert (work / "count").read_text().strip() == "8", banyan(cluster, "ls", "--job", job).stdout + waited.stderr
    assert cluster.task(ids["reduce"])["exit_status"] == "success"
    # the cleanup ran because p3 failed
    assert (work / "cleaned").read_text() == "cleaned\n"
    # the report needed p3's success: cancelled, and wait names p3 and how it ended
    report = cluster.task(ids["report"])
    assert report["state"] == "cancelled" and report["history"] == []
    assert report["cancelled_by"]["task"] == ids["p3"] and report["cancelled_by"]["exit_status"] == "failure"
    assert report["pending_parents"] == [] and report["pending_dependency_count"] == 0
    line = next(line for line in waited.stderr.splitlines() if ids["report"] in line)
    assert ids["p3"] in line and "failure" in line, waited.stderr
    assert "without running" in banyan(cluster, "show", ids["report"]).stdout
    counts = job_line(cluster, job)
    assert (counts["TOTAL"], counts["FAILED"], counts["CANCELLED"], counts["SUCCEEDED"]) == ("13", "2", "1", "10")
    api = cluster.http.get("%s/jobs/%s" % (cluster.url, job)).json()
    assert api["counts"] == {"queued": 0, "running": 0, "succeeded": 10, "failed": 2, "cancelled": 1, "total": 13}

    # fix the input and retry the failed points: the report comes back with p3
    (work / "bad").write_text("\n")
    retried = banyan(cluster, "retry", "--job", job, "--failed")
    assert {line.split()[0] for line in retried.stdout.splitlines()} == {ids["p3"], ids["p7"]}
    banyan(cluster, "wait", "--job", job)
    assert (work / "reported").read_text() == "reported\n"
    for name in ("p3", "p7", "report"):
        task = cluster.task(ids[name])
        assert (task["state"], task["exit_status"]) == ("terminated", "success"), (name, task)
    assert len(cluster.task(ids["p3"])["history"]) == 2  # a new attempt, the first one kept
    counts = job_line(cluster, job)
    assert (counts["STATUS"], counts["SUCCEEDED"], counts["TOTAL"]) == ("succeeded", "13", "13")
    # nothing left to retry: a success is never run again
    assert "nothing to retry" in banyan(cluster, "retry", "--job", job).stderr
    refused = banyan(cluster, "retry", ids["p1"], ok=False)
    assert refused.returncode == 1 and "success" in refused.stderr


def test_submit_runs_where_it_was_run_with_the_environment_asked_for(cluster, tmp_path):
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "scripts" / "show.sh").write_text('echo "dir=$(pwd) foo=$FOO bar=$BAR"\n')
    task = banyan(
        cluster,
        "submit",
        "--env",
        "FOO",
        "--env",
        "BAR=given",
        "--",
        "sh scripts/show.sh",
        cwd=project,
        env={"FOO": "from-my-shell"},
    ).stdout.strip()
    banyan(cluster, "wait", task)
    assert banyan(cluster, "logs", task).stdout == "dir=%s foo=from-my-shell bar=given\n" % project
    assert cluster.task(task)["working_directory"] == str(project)

    exported = banyan(
        cluster,
        "submit",
        "--export-env",
        "--cwd",
        project / "scripts",
        "--",
        "sh show.sh",
        cwd=tmp_path,
        env={"FOO": "exported", "BAR": "too"},
    ).stdout.strip()
    banyan(cluster, "wait", exported)
    assert banyan(cluster, "logs", exported).stdout == "dir=%s foo=exported bar=too\n" % (project / "scripts")
    assert "BANYAN_TOKEN" not in cluster.task(exported)["environment"]

    unset = banyan(cluster, "submit", "--env", "NOT_SET_ANYWHERE", "--", "true", ok=False)
    assert unset.returncode == 2 and "NOT_SET_ANYWHERE" in unset.stderr


def test_a_task_no_worker_can_fit_says_why(cluster):
    result = banyan(cluster, "submit", "--gpus", "1", "--name", unique("gpu"), "--", "nvidia-smi")
    task = result.stdout.strip()
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "gpus 1" in warning[0] and "gpus 0" in warning[0], result.stderr
    reason = cluster.task(task)["pending_reason"]
    assert reason["code"] == "no_worker_fits" and reason["asks"]["gpus"] == 1 and reason["largest"]["gpus"] == 0
    shown = banyan(cluster, "show", task).stdout
    assert "no live worker could ever fit it" in shown and "gpus 1" in shown
    waited = banyan(cluster, "wait", "--timeout", "2", task, ok=False)
    assert waited.returncode == 4
    assert "no live worker could ever fit it" in waited.stderr
    listed = banyan(cluster, "ls", "--format", "id,state,reason", "--where", json.dumps({"_id": task})).stdout
    assert listed.split("\t")[:2] == [task, "available"] and "gpus 1" in listed
    banyan(cluster, "cancel", task)
    assert cluster.task(task)["pending_reason"] is None


def _max_overlap(intervals):
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_array_limit_runs_at_most_that_many_at_once(cluster):
    result = banyan(cluster, "submit", "--array", "1-20%3", "--name", unique("capped"), "--", "sleep 0.3")
    ids = result.stdout.split()
    assert len(ids) == 20 and "at most 3 at once" in result.stderr
    banyan(cluster, "wait", *ids)
    intervals = []
    for task_id in ids:
        attempt = cluster.task(task_id)["history"][-1]
        intervals.append((when(attempt["started"]), when(attempt["ended"])))
    assert _max_overlap(intervals) <= 3
    job = cluster.http.get("%s/jobs/%s" % (cluster.url, submitted_job(result))).json()
    assert job["array_limit"] == 3 and job["slots"] == [] and job["counts"]["succeeded"] == 20


def test_hold_release_and_priority_changed_while_queued(cluster):
    blocker = banyan(cluster, "submit", "--cores", "16", "--", "sleep 60").stdout.strip()
    wait_for(lambda: cluster.task(blocker)["state"] == "running", 30, "the blocker to start")

    result = banyan(cluster, "submit", "--array", "1-3", "--cores", "16", "--name", unique("held"), "--", "true")
    held, job = result.stdout.split(), submitted_job(result)
    assert len(banyan(cluster, "hold", "--job", job).stdout.splitlines()) == 3
    first = banyan(cluster, "submit", "--cores", "16", "--", "true").stdout.strip()
    second = banyan(cluster, "submit", "--cores", "16", "--", "true").stdout.strip()
    # a priority changed while the task is available decides the claim order
    patched = cluster.http.patch("%s/tasks/%s" % (cluster.url, second), json={"priority": 10})
    assert patched.status_code == 200, patched.text
    for task_id in held:
        task = cluster.task(task_id)
        assert task["held"] is True and task["pending_reason"]["code"] == "held"
    assert "held" in banyan(cluster, "ls", "--job", job).stdout

    banyan(cluster, "cancel", blocker)
    banyan(cluster, "wait", first, second)
    assert when(cluster.task(second)["history"][0]["started"]) < when(cluster.task(first)["history"][0]["started"])
    # the worker took newer tasks: the held ones, older, were never claimed
    assert {cluster.task(t)["state"] for t in held} == {"available"}

    released = banyan(cluster, "release", "--job", job)
    assert len(released.stdout.splitlines()) == 3
    banyan(cluster, "wait", "--job", job)
    assert {cluster.task(t)["exit_status"] for t in held} == {"success"}
    # nothing to hold once finished
    refused = banyan(cluster, "hold", held[0], ok=False)
    assert refused.returncode == 1 and "only queued tasks" in refused.stderr


def test_logs_follow_prints_output_while_the_task_runs(cluster, tmp_path):
    gate = tmp_path / "gate"
    task = banyan(
        cluster, "submit", "--", "echo first; while [ ! -e %s ]; do sleep 0.05; done; echo second" % gate
    ).stdout.strip()
    follow = subprocess.Popen(
        BANYAN + ["logs", "--follow", task],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster.env(),
    )
    watchdog = threading.Timer(60, follow.kill)  # a regression fails the test, never hangs it
    watchdog.start()
    try:
        # the task is still blocked on the gate: "first" can only come from live output
        assert follow.stdout.readline() == "first\n"
        assert cluster.task(task)["state"] == "running"
        gate.touch()
        out, err = follow.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, err
    assert out == "second\n"
    assert banyan(cluster, "logs", task).stdout == "first\nsecond\n"
