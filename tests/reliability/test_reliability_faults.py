"""Faults: the embedded server killed with SIGKILL mid-run and restarted,
workers killed with SIGKILL mid-run, and a worker cut off from the server
by taking down its network link. Nothing acknowledged is lost, no attempt
runs twice, every task ends as the rules say.
"""

import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest
import requests
from conftest import MONGO_URI, TestSession, wait_for
from harness import Cluster, graph_bodies, judge, parents_by_id, report, submit_graph, task_body

pytestmark = pytest.mark.slow

FAIL_PERCENT = 20
#: The killed-workers test's heartbeat timeout (server) and interval
#: (workers): on a busy FerretDB a heartbeat took over a second at times,
#: and workers beating every 0.5 s under a 2 s timeout were marked lost 142
#: times in 2 minutes. The workers keep their tasks as long as the server
#: keeps them.
KILLED_HEARTBEAT_TIMEOUT, KILLED_HEARTBEAT = (10, 2) if MONGO_URI else (2, 0.5)
#: Seconds a restarted server may take to answer: on a busy FerretDB its
#: first reads took over 30 s (a deadline for a stuck start, not a speed).
RESTART_DEADLINE = 120 if MONGO_URI else 30


class Submitter(threading.Thread):
    """Submits batches of independent tasks while faults happen, keeping
    the ids of those the server acknowledged (201). A batch whose answer
    never came is not acknowledged (it may or may not exist)."""

    def __init__(self, cluster, bodies, batch=10):
        super().__init__(daemon=True)
        self.cluster, self.bodies, self.batch = cluster, bodies, batch
        self.acknowledged = []
        self.unanswered = 0
        self.error = None

    def run(self):
        session = TestSession()
        try:
            i = 0
            while i < len(self.bodies):
                chunk = self.bodies[i : i + self.batch]
                try:
                    r = session.post(self.cluster.url + "/tasks", json=chunk, timeout=30)
                except requests.RequestException:
                    self.unanswered += 1
                    time.sleep(0.1)
                    continue  # not acknowledged: send the batch again
                assert r.status_code == 201, (r.status_code, r.text[:2000])
                self.acknowledged += [item["_id"] for item in r.json()["_items"]]
                i += self.batch
                time.sleep(0.05)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            session.close()


def finished_count(cluster):
    r = cluster.request("GET", "/tasks", params={"max_results": 1, "where": '{"state": "terminated"}'})
    return r.json()["_meta"]["total"]


def test_server_killed_twice_mid_run(tmp_path):
    """SIGKILL the embedded server twice while workers run tasks and a
    client submits more; restart it on the same data dir and port each time."""
    rng = random.Random(91)
    # The workers outlast a restart (5 s without an answer before they kill
    # their tasks), as does the server's patience with them.
    cluster = Cluster(tmp_path, workers=4, cores=2, heartbeat_timeout=5, worker_args={"timeout": 5}).start()
    started = time.monotonic()
    kills = 0
    try:
        levels, parents = graph_bodies(cluster.markers, 200, FAIL_PERCENT, rng, sleep=0.2)
        ids = submit_graph(cluster, levels)
        submitter = Submitter(cluster, [task_body(cluster.markers, FAIL_PERCENT, sleep=0.2) for _ in range(300)])
        submitter.start()
        for threshold in (60, 160):
            wait_for(lambda: finished_count(cluster) >= threshold, 120, "%d finished tasks" % threshold)
            cluster.server.kill(signal.SIGKILL)
            kills += 1
            cluster.server.start(timeout=RESTART_DEADLINE)
        submitter.join(timeout=180)
        assert not submitter.is_alive() and submitter.error is None, submitter.error
        assert all(w.alive() for w in cluster.workers), "a worker died with the server"
        cluster.wait_all_finished(timeout=180)
        tasks = cluster.all_tasks()
        workers = cluster.request("GET", "/workers").json()["_items"]
    finally:
        cluster.stop()
    seconds = time.monotonic() - started
    acknowledged = set(ids.values()) | set(submitter.acknowledged)
    _, duplicates, lost, problems = judge(
        cluster.markers, tasks, acknowledged, parents_by_id(ids, parents), strict=False
    )
    report(
        "server SIGKILL",
        lost,
        duplicates,
        problems,
        load="%d tasks acknowledged (%d in all), 4 workers x 2 slots" % (len(acknowledged), len(tasks)),
        faults="server SIGKILLed %d times mid-run and restarted; %d submissions unanswered"
        % (kills, submitter.unanswered),
        seconds=seconds,
    )
    # the workers carried on: those registered at the start are still active
    assert sum(1 for w in workers if w["state"] == "active") >= 4, workers
    assert cluster.server_log_errors() == []


def test_workers_killed_mid_run(tmp_path):
    """SIGKILL two of four workers while they hold tasks: after the
    heartbeat timeout their tasks run again on the others and end."""
    rng = random.Random(92)
    cluster = Cluster(
        tmp_path,
        workers=4,
        cores=2,
        heartbeat_timeout=KILLED_HEARTBEAT_TIMEOUT,
        worker_args={"heartbeat": KILLED_HEARTBEAT, "timeout": KILLED_HEARTBEAT_TIMEOUT},
    ).start()
    started = time.monotonic()
    try:
        levels, parents = graph_bodies(cluster.markers, 120, FAIL_PERCENT, rng, sleep=0.5)
        ids = submit_graph(cluster, levels)
        wait_for(lambda: finished_count(cluster) >= 30, 120, "30 finished tasks")
        for victim in cluster.workers[:2]:
            victim.kill(signal.SIGKILL)
        # what the dead workers held: the server still counts them running
        victims = [
            w
            for w in cluster.request("GET", "/workers").json()["_items"]
            if w["host"] in ("w0", "w1") and w["state"] == "active"
        ]
        victim_ids = [w["_id"] for w in victims]
        # (a task among them may have ended just before the kill, its report
        # on its way: the server lists it until the report is written)
        orphaned = [t for w in victims for t in w["running"]]
        wait_for(
            lambda: all(cluster.request("GET", "/workers/" + wid).json()["state"] == "lost" for wid in victim_ids),
            KILLED_HEARTBEAT_TIMEOUT + 30,
            "the killed workers marked lost",
        )
        cluster.wait_all_finished(timeout=180)
        tasks = cluster.all_tasks()
    finally:
        cluster.stop()
    seconds = time.monotonic() - started
    runs, duplicates, lost, problems = judge(
        cluster.markers, tasks, ids.values(), parents_by_id(ids, parents), strict=False
    )
    abandoned, reported = [], []
    for task_id in orphaned:
        history = tasks[task_id]["history"]
        # the attempt it held when its worker died
        killed = [h for h in history if h["worker"] in victim_ids][-1:]
        assert killed, history
        killed = killed[0]
        later = history[history.index(killed) + 1 :]
        assert all(h["worker"] not in victim_ids for h in later), history
        if killed["exit_status"] == "abandoned (worker unreachable)":
            abandoned.append(task_id)
            if tasks[task_id]["exit_status"] != "abandoned (worker unreachable)":
                # retried elsewhere (unless abandonment used up its last retry)
                assert later, history
        else:
            # Its command had ended and the worker's report was on its way
            # (only a worker reports; the kill ends its supervisors and their
            # tasks): recorded as the command ended, which its marker shows.
            reported.append(task_id)
            ran = runs.get(task_id, {}).get(killed["attempt"])
            assert killed["exit_status"] in ("success", "failure") and killed["exit_code"] == ran, (history, ran)
    report(
        "worker SIGKILL",
        lost,
        duplicates,
        problems,
        load="%d tasks, 4 workers x 2 slots" % len(ids),
        faults="2 workers SIGKILLed holding %d tasks (%d reports of them on their way)"
        % (len(orphaned), len(reported)),
        seconds=seconds,
    )
    assert abandoned, "the killed workers held no running task; nothing was tested (%d reported)" % len(reported)
    assert cluster.server_log_errors() == []


# -- a worker cut off from the network -------------------------------------------


def _netns_unavailable():
    """Why a network namespace cannot be made here, or None."""
    ip = shutil.which("ip")
    if ip is None:
        return "the 'ip' command (iproute2) is not installed"
    name = "banyan-probe-%d" % os.getpid()
    probe = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return "cannot create a network namespace (needs CAP_NET_ADMIN): %s" % probe.stderr.strip()
    subprocess.run([ip, "netns", "del", name], capture_output=True)
    return None


class NetNamespace:
    """A network namespace joined to this one by a veth pair with private
    /30 addresses: `host_ip` here, `ns_ip` inside."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.name = "banyan-rel-%s" % tag
        self.host_if, self.ns_if = "byh%s" % tag, "byn%s" % tag
        octet = random.Random(tag).randrange(1, 250)
        self.host_ip, self.ns_ip = "10.213.%d.1" % octet, "10.213.%d.2" % octet

    def ip(self, *args, netns=False):
        cmd = ["ip"] + (["netns", "exec", self.name, "ip"] if netns else []) + list(args)
        subprocess.run(cmd, check=True, capture_output=True)

    def create(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.ip("link", "set", self.ns_if, "netns", self.name)
        self.ip("addr", "add", self.host_ip + "/30", "dev", self.host_if)
        self.ip("link", "set", self.host_if, "up")
        self.ip("addr", "add", self.ns_ip + "/30", "dev", self.ns_if, netns=True)
        self.ip("link", "set", "lo", "up", netns=True)
        self.ip("link", "set", self.ns_if, "up", netns=True)
        return self

    def link(self, up):
        """Take the namespace's end of the link down (or up again)."""
        self.ip("link", "set", self.ns_if, "up" if up else "down", netns=True)

    def prefix(self):
        return ["ip", "netns", "exec", self.name]

    def destroy(self):
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def test_worker_cut_off_from_the_server(tmp_path):
    reason = _netns_unavailable()
    if reason:
        pytest.skip("a worker cannot be cut off in its own network namespace here: " + reason)
    net = NetNamespace().create()
    token_file = tmp_path / "admin.token"
    cluster = Cluster(
        tmp_path,
        workers=0,
        cores=2,
        heartbeat_timeout=3,
        server_args=["--host", net.host_ip, "--auth", "--admin-token-file", str(token_file)],
    )
    started = time.monotonic()
    try:
        cluster.server.start()
        cluster.http.headers["Authorization"] = "Bearer " + token_file.read_text().strip()
        worker_token = cluster.request("POST", "/tokens", json={"role": "worker", "name": "w"}).json()["token"]
        # the worker that will be cut off, alone at first so that it takes the long tasks
        cluster.add_worker(prefix=net.prefix(), token=worker_token, timeout=2, host="cut-off")
        ids = cluster.submit([task_body(cluster.markers, 0, sleep=8, max_retries=1) for _ in range(2)])

        def workers(state="active"):
            return [w for w in cluster.request("GET", "/workers").json()["_items"] if w["state"] == state]

        wait_for(lambda: any(len(w["running"]) == 2 for w in workers()), 60, "the worker to run 2 tasks")
        (cut_doc,) = workers()
        held = sorted(cut_doc["running"])
        for _ in range(2):
            cluster.add_worker(token=worker_token)
        ids += cluster.submit([task_body(cluster.markers, FAIL_PERCENT, sleep=0.2) for _ in range(40)])
        time.sleep(1)
        net.link(False)
        cut_at = time.monotonic()
        # the server requeues its tasks after its heartbeat timeout; the
        # worker kills them after its own (shorter) timeout
        wait_for(lambda: cut_doc["_id"] in [w["_id"] for w in workers("lost")], 30, "the worker marked lost")
        time.sleep(max(0.0, 6 - (time.monotonic() - cut_at)))
        net.link(True)
        cluster.wait_all_finished(timeout=120)
        # the cut-off worker registers again and carries on
        wait_for(lambda: any(w["host"] == "cut-off" for w in workers()), 60, "the cut-off worker back")
        more = cluster.submit([task_body(cluster.markers, 0, sleep=0.1) for _ in range(8)])
        cluster.wait_all_finished(timeout=60)
        tasks = cluster.all_tasks()
        rejoined = [w for w in workers() if w["host"] == "cut-off"]
    finally:
        cluster.stop()
        net.destroy()
    seconds = time.monotonic() - started
    time.sleep(1)
    runs, duplicates, lost, problems = judge(cluster.markers, tasks, ids + more, {}, strict=False)
    report(
        "worker cut off (netns)",
        lost,
        duplicates,
        problems,
        load="%d tasks, 3 workers x 2 slots" % len(tasks),
        faults="link of a worker holding %d tasks taken down for 6 s" % len(held),
        seconds=seconds,
    )
    assert held
    for task_id in held:
        history = tasks[task_id]["history"]
        cut_attempts = [h for h in history if h["worker"] == cut_doc["_id"]]
        assert [h["exit_status"] for h in cut_attempts] == ["abandoned (worker unreachable)"], history
        # it was killed by its own worker: its marker never got an exit code
        assert runs[task_id][cut_attempts[0]["attempt"]] is None, runs[task_id]
        ended = [h for h in history if h["exit_status"] in ("success", "failure")]
        assert len(ended) == 1 and ended[0]["worker"] != cut_doc["_id"], history
    assert rejoined and rejoined[0]["_id"] != cut_doc["_id"]
    assert cluster.server_log_errors() == []
