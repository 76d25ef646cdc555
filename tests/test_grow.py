"""Issue 18 as a user meets it: tasks that add tasks to their own job while
they run (`banyan submit --child`), through the real `banyan` command, a
live server with authentication on and a real worker. Each attempt runs
with its own token, which these tests also turn against other users' work."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import requests
from conftest import CheckedSession, LiveServer, wait_for
from test_cli import BANYAN, WORKER, Cluster, banyan, shared, unique, when

pytestmark = pytest.mark.slow

#: The `banyan` command as a task's shell runs it.
BANYAN_SH = " ".join(shlex.quote(word) for word in BANYAN)


class AuthCluster(Cluster):
    """A live server with authentication on, a worker with a worker token,
    and two users, alice (who runs these tests) and bob."""

    def __init__(self, base, heartbeat=3):
        self.base = base
        self.server = LiveServer(base / "server-data", ["--auth"]).start()
        self.url = self.server.url
        admin = open(os.path.join(self.server.data_dir, "admin.token")).read().strip()
        self.tokens = {}
        for role, name in (("worker", "farm"), ("user", "alice"), ("user", "bob")):
            r = requests.post(
                self.url + "/tokens",
                json={"role": role, "name": name},
                headers={"Authorization": "Bearer " + admin},
                timeout=10,
            )
            assert r.status_code == 201, r.text
            self.tokens[name] = r.json()["token"]
        self.http = CheckedSession()
        self.http.headers["Authorization"] = "Bearer " + self.tokens["alice"]
        self.home = base / "home"
        self.home.mkdir()
        self.worker_log = open(base / "worker.log", "wb")
        self.worker = subprocess.Popen(
            WORKER
            + [
                "--server",
                self.url,
                "--token",
                self.tokens["farm"],
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
            env=self.env(BANYAN_TOKEN=None),
        )
        self.worker_id = wait_for(self._active_worker, 30, "the worker to register")

    def env(self, **extra):
        return super().env(**dict({"BANYAN_TOKEN": self.tokens["alice"]}, **extra))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from shared(AuthCluster(tmp_path_factory.mktemp("grow")))


def job_of(result):
    line = next(line for line in result.stderr.splitlines() if line.startswith("job "))
    return line.split()[1]


def ended(task):
    return when(task["history"][-1]["ended"])


def started(task):
    return when(task["history"][-1]["started"])


def test_a_splitter_adds_shards_that_a_merge_declared_before_it_waits_for(cluster, tmp_path):
    work = tmp_path / "split"
    work.mkdir()
    (work / "input").write_text("5\n")
    # how many shards is known only once the splitter read its input
    (work / "split.sh").write_text(
        "env | grep ^BANYAN_ | cut -d= -f1 | sort > seen-env\n"
        'echo "$BANYAN_TOKEN" > token\n'
        "n=$(cat input)\n"
        "%s submit --child --name shard --array 1-$n -- "
        "sh -c 'sleep 0.5; echo $BANYAN_ARRAY_INDEX > out.$BANYAN_ARRAY_INDEX'\n" % BANYAN_SH
    )
    split = banyan(
        cluster, "submit", "--hold", "--name", "split", "--job-name", unique("split"), "--", "sh split.sh", cwd=work
    )
    splitter, job = split.stdout.strip(), job_of(split)
    merge = banyan(
        cluster,
        "submit",
        "--job",
        job,
        "--name",
        "merge",
        "--after",
        splitter,
        "--",
        "cat out.* | sort -n | tr '\\n' ' ' > merged",
        cwd=work,
    ).stdout.strip()
    banyan(cluster, "release", splitter)
    banyan(cluster, "wait", "--job", job, timeout=180)

    assert (work / "merged").read_text() == "1 2 3 4 5 "
    shards = cluster.tasks({"added_by": splitter})
    assert len(shards) == 5 and {t["job"] for t in shards} == {job}
    assert all(t["state"] == "terminated" and t["exit_status"] == "success" for t in shards)
    assert {(t["depth"], t["added_in_attempt"], t["superseded"]) for t in shards} == {(1, 1, False)}
    merged = cluster.task(merge)
    assert merged["exit_status"] == "success"
    assert started(merged) >= max(ended(t) for t in shards)
    # the attempt ran with the four variables, and its token died with it
    assert {"BANYAN_SERVER", "BANYAN_TASK_ID", "BANYAN_JOB_ID", "BANYAN_TOKEN"} <= set(
        (work / "seen-env").read_text().split()
    )
    token = (work / "token").read_text().strip()
    assert token.startswith("byn_") and token not in cluster.tokens.values()
    r = requests.get(cluster.url + "/tasks/" + splitter, headers={"Authorization": "Bearer " + token}, timeout=10)
    assert r.status_code == 401
    # banyan jobs JOB shows who added whom
    tree = banyan(cluster, "jobs", job).stdout.splitlines()
    assert sum("  shard" in line and "added by attempt 1" in line for line in tree) == 5, tree
    assert any(line.startswith(splitter) and " split " in line for line in tree), tree


def test_an_adaptive_sweep_refines_around_its_best_point(cluster, tmp_path):
    work = tmp_path / "sweep"
    work.mkdir()
    # score(x) = -(x - 2.6)^2; each coarse point waits for the other three,
    # and the best adds three refinements around itself
    (work / "point.sh").write_text(
        "x=$1\n"
        "awk -v x=$x 'BEGIN { printf \"%%g %%g\\n\", -(x - 2.6) ^ 2, x }' > score.$x\n"
        '[ "$2" = fine ] && exit 0\n'
        "i=0; while [ $(ls score.* | wc -l) -lt 4 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
        'best=$(cat score.* | sort -g -r | head -1 | cut -d" " -f2)\n'
        '[ "$best" = "$x" ] || exit 0\n'
        "for dx in -0.5 0.5 1; do\n"
        "  %s submit --child --name refine -- sh point.sh $(awk -v x=$x -v d=$dx 'BEGIN { print x + d }') fine\n"
        "done\n" % BANYAN_SH
    )
    (work / "graph.yaml").write_text(
        json.dumps(
            {
                "tasks": [{"name": "p%d" % x, "command": "sh point.sh %d" % x} for x in (0, 2, 4, 6)]
                + [
                    {
                        "name": "report",
                        "command": "cat score.* | sort -g -r | head -1 | cut -d' ' -f2 > best; ls score.* | wc -l > n",
                        "after": ["p0", "p2", "p4", "p6"],
                    }
                ]
            }
        )
    )
    result = banyan(cluster, "submit", "--file", "graph.yaml", cwd=work)
    ids = dict(reversed(line.split()) for line in result.stdout.splitlines())
    job = job_of(result)
    banyan(cluster, "wait", "--job", job, timeout=180)

    assert (work / "best").read_text().strip() == "2.5"
    assert (work / "n").read_text().strip() == "7"
    refinements = cluster.tasks({"job": job, "added_by": {"$ne": None}})
    assert len(refinements) == 3 and {t["added_by"] for t in refinements} == {ids["p2"]}
    tasks = cluster.tasks({"job": job})
    assert len(tasks) == 8
    report = cluster.task(ids["report"])
    assert report["exit_status"] == "success"
    assert started(report) >= max(ended(t) for t in tasks if t["_id"] != report["_id"])


def test_the_attempt_token_reads_its_job_adds_to_it_and_nothing_else(cluster, tmp_path):
    work = tmp_path / "token"
    work.mkdir()
    bob = {"Authorization": "Bearer " + cluster.tokens["bob"]}
    bob_job = requests.post(cluster.url + "/jobs", json={"name": "bobs"}, headers=bob, timeout=10).json()["_id"]
    r = requests.post(
        cluster.url + "/tasks",
        json={"command": "true", "job": bob_job, "held": True, "state": "available"},
        headers=bob,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    bobs_task = r.json()["_id"]
    (work / "probe.py").write_text(
        """
import json, os, requests
url, token = os.environ["BANYAN_SERVER"], os.environ["BANYAN_TOKEN"]
me, job = os.environ["BANYAN_TASK_ID"], os.environ["BANYAN_JOB_ID"]
h = {"Authorization": "Bearer " + token}
def code(method, path, body=None):
    return requests.request(method, url + path, json=body, headers=h, timeout=10).status_code
out = {
    "own task": code("GET", "/tasks/" + me),
    "own job": code("GET", "/jobs/" + job),
    "list": requests.get(url + "/tasks", headers=h, timeout=10).json()["_meta"]["total"],
    "bob's task": code("GET", "/tasks/%(bob)s"),
    "bob's task listed": requests.get(url + "/tasks", params={"where": json.dumps({"_id": "%(bob)s"})},
                                      headers=h, timeout=10).json()["_meta"]["total"],
    "change bob's task": code("PATCH", "/tasks/%(bob)s", {"priority": 5}),
    "cancel bob's task": code("PATCH", "/tasks/%(bob)s", {"state": "cancelled"}),
    "add to bob's job": code("POST", "/tasks", {"command": "true", "job": "%(bob_job)s"}),
    "child of bob's task": code("POST", "/tasks", {"command": "true", "added_by": "%(bob)s"}),
    "change own task": code("PATCH", "/tasks/" + me, {"priority": 5}),
    "retry": code("POST", "/tasks/retry", {"ids": [me]}),
    "workers": code("GET", "/workers"),
    "tokens": code("GET", "/tokens"),
    "jobs": code("GET", "/jobs"),
    "claim": code("POST", "/workers/%(worker)s/claim", {"free": {"cores": 1}}),
    "add child": code("POST", "/tasks", {"command": "true", "added_by": me}),
}
json.dump(out, open("probe.json", "w"))
open("token", "w").write(token)
"""
        % {"bob": bobs_task, "bob_job": bob_job, "worker": cluster.worker_id}
    )
    result = banyan(cluster, "submit", "--name", "probe", "--wait", "--", sys.executable, "probe.py", cwd=work)
    probe = result.stdout.split()[0]
    seen = json.loads((work / "probe.json").read_text())
    assert seen == {
        "own task": 200,
        "own job": 200,
        "list": 1,
        "bob's task": 404,
        "bob's task listed": 0,
        "change bob's task": 403,
        "cancel bob's task": 403,
        "add to bob's job": 422,
        "child of bob's task": 422,
        "change own task": 403,
        "retry": 403,
        "workers": 403,
        "tokens": 403,
        "jobs": 403,
        "claim": 403,
        "add child": 201,
    }, seen
    bobs = requests.get(cluster.url + "/tasks/" + bobs_task, headers=bob, timeout=10).json()
    assert (bobs["state"], bobs["priority"]) == ("available", 0)
    assert cluster.tasks({"job": bob_job}) == []  # alice sees none of bob's
    child = cluster.tasks({"added_by": probe})
    assert len(child) == 1 and child[0]["owner"] == "alice"
    # the attempt ended: its token is refused, and no longer stored
    token = (work / "token").read_text()
    r = requests.get(cluster.url + "/tasks/" + probe, headers={"Authorization": "Bearer " + token}, timeout=10)
    assert r.status_code == 401
    r = requests.post(
        cluster.url + "/tasks",
        json={"command": "true", "added_by": probe},
        headers={"Authorization": "Bearer " + token},
        timeout=10,
    )
    assert r.status_code == 401
    # a child is added only by a running task
    r = cluster.http.post(cluster.url + "/tasks", json={"command": "true", "added_by": probe})
    assert r.status_code == 409 and "only a running task" in r.json()["_error"]["message"]


def test_a_runaway_chain_stops_at_the_depth_limit_with_a_clear_message(cluster, tmp_path):
    work = tmp_path / "runaway"
    work.mkdir()
    (work / "again.sh").write_text("echo $BANYAN_TASK_ID >> chain\n%s submit --child -- sh again.sh\n" % BANYAN_SH)
    other = banyan(cluster, "submit", "--name", "bystander", "--", "sleep 1").stdout.strip()
    result = banyan(cluster, "submit", "--max-depth", "3", "--name", "runaway", "--", "sh again.sh", cwd=work)
    job = job_of(result)
    waited = banyan(cluster, "wait", "--job", job, ok=False, timeout=180)
    assert waited.returncode == 1
    tasks = cluster.tasks({"job": job})
    assert sorted(t["depth"] for t in tasks) == [0, 1, 2, 3]
    deepest = next(t for t in tasks if t["depth"] == 3)
    assert deepest["exit_status"] == "failure"
    assert all(t["exit_status"] == "success" for t in tasks if t["depth"] < 3)
    stderr = cluster.http.get(cluster.url + "/tasks/%s/logs" % deepest["_id"]).json()["stderr"]
    assert "422" in stderr and "depth 3 (--max-depth)" in stderr, stderr
    assert len((work / "chain").read_text().split()) == 4
    banyan(cluster, "wait", other)
    assert cluster.task(other)["exit_status"] == "success"

    # the cap on tasks added in all, the same way
    (work / "many.sh").write_text("%s submit --child --array 1-5 -- true\n" % BANYAN_SH)
    result = banyan(cluster, "submit", "--max-tasks", "3", "--name", "many", "--", "sh many.sh", cwd=work)
    job = job_of(result)
    banyan(cluster, "wait", "--job", job, ok=False, timeout=120)
    [many] = cluster.tasks({"job": job})
    stderr = cluster.http.get(cluster.url + "/tasks/%s/logs" % many["_id"]).json()["stderr"]
    assert "add 3 tasks in all (--max-tasks)" in stderr and "this adds 5" in stderr, stderr
    assert cluster.http.get(cluster.url + "/jobs/" + job).json()["added_tasks"] == 0


def test_retry_of_a_parent_that_added_children_and_failed_gives_one_set(cluster, tmp_path):
    work = tmp_path / "retry"
    work.mkdir()
    # attempt 1 adds three children that wait on a file, then fails;
    # attempt 2 adds three that finish, and succeeds
    (work / "parent.sh").write_text(
        "a=$BANYAN_ATTEMPT\n"
        '%s submit --child --name child --array 1-3 -- sh -c "while [ ! -e go ]; do sleep 0.1; done; '
        'echo $a >> out.\\$BANYAN_ARRAY_INDEX"\n'
        "[ $a -ge 2 ] || exit 3\n" % BANYAN_SH
    )
    result = banyan(cluster, "submit", "--hold", "--name", "parent", "--", "sh parent.sh", cwd=work)
    parent, job = result.stdout.strip(), job_of(result)
    merge = banyan(
        cluster,
        "submit",
        "--job",
        job,
        "--name",
        "merge",
        "--after",
        parent,
        "--",
        "cat out.* | tr '\\n' ' ' > merged",
        cwd=work,
    ).stdout.strip()
    banyan(cluster, "release", parent)
    failed = banyan(cluster, "wait", parent, ok=False)
    assert failed.returncode == 1
    first = cluster.tasks({"added_by": parent})
    assert len(first) == 3
    assert wait_for(
        lambda: all(t["state"] == "cancelled" for t in cluster.tasks({"added_by": parent})),
        30,
        "the failed attempt's children to be cancelled",
    )
    assert cluster.task(merge)["state"] == "cancelled"

    (work / "go").write_text("")
    banyan(cluster, "retry", parent)
    banyan(cluster, "wait", "--job", job, ok=False, timeout=180)
    children = cluster.tasks({"added_by": parent})
    current = [t for t in children if not t["superseded"]]
    assert len(children) == 6 and len(current) == 3
    assert {t["added_in_attempt"] for t in current} == {2}
    assert all(t["exit_status"] == "success" for t in current)
    assert all(
        t["state"] == "cancelled" and t["superseded"] and t["history"] == [] or t["exit_status"] != "success"
        for t in children
        if t["added_in_attempt"] == 1
    )
    merged = cluster.task(merge)
    assert merged["exit_status"] == "success"
    assert (work / "merged").read_text() == "2 2 2 "
    assert started(merged) >= max(ended(t) for t in current)
    tree = banyan(cluster, "jobs", job).stdout
    assert tree.count("superseded") == 3, tree
