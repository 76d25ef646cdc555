"""Several `banyan server` processes over one database behave as one queue.

Three servers share one MongoDB-protocol database (FerretDB in CI); workers,
claimers and clients are spread over them. Each attempt leaves a marker file
(see harness.py), so a task run twice, or lost, shows. These tests need a
database several processes can share: on the embedded store (one process
owns its files) they are skipped, saying so.
"""

import json
import random
import signal
import threading
import time
import uuid

import pytest
import requests
from conftest import MONGO_URI, LiveServer, TestSession, mongo_uri_for, wait_for
from harness import (
    TASK_FIELDS,
    Worker,
    graph_bodies,
    judge,
    parents_by_id,
    read_all_tasks,
    report,
    submit_graph,
    task_body,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MONGO_URI, reason="several servers need a shared database (set BANYAN_TEST_MONGO_URI)"),
]

#: The servers' heartbeat timeout and the workers' interval: on FerretDB,
#: busy with 4 workers' claims, a heartbeat took over a second at times, and
#: workers beating every 0.5 s under a 5 s timeout were marked lost 26 times
#: in 3 minutes (their tasks run again while they still ran them). The
#: workers keep their tasks as long as the servers keep them (15 s).
HEARTBEAT_TIMEOUT = 15
WORKER_HEARTBEAT = 5
#: Tasks a worker claims beyond its free slots: one claim (one sorted read
#: of the ready tasks, which FerretDB 1.x makes in its own process) brings
#: several of these short tasks, not one.
PREFETCH = 4
FAIL_PERCENT = 10


class Servers:
    """`n` live servers over one fresh database, and requests spread over them."""

    def __init__(self, tmp_path, n=3, args=()):
        self.uri = mongo_uri_for("banyan_multi_%s" % uuid.uuid4().hex[:12])
        self.servers = [
            LiveServer(
                tmp_path / ("server%d" % i),
                ["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)] + list(args),
                mongo_uri=self.uri,
            ).start()
            for i in range(n)
        ]
        self.http = TestSession()
        self._next = 0
        self._lock = threading.Lock()

    def url(self, i=None):
        if i is None:
            with self._lock:
                self._next += 1
                i = self._next
        return self.servers[i % len(self.servers)].url

    def request(self, method, path, server=None, deadline=60, **kwargs):
        """A request to one of the servers (the next, unless named), waiting
        out one that restarts; any 5xx fails the test."""
        end = time.monotonic() + deadline
        while True:
            url = self.url(server)
            try:
                r = self.http.request(method, url + path, timeout=30, **kwargs)
            except requests.ConnectionError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
                continue
            assert r.status_code < 500, "%s %s%s answered %s: %s" % (method, url, path, r.status_code, r.text[:2000])
            return r

    def submit(self, bodies, server=None, deadline=300):
        """POST tasks as a client that retries a lost answer does: under an
        `Idempotency-Key`, sent again (through the next server) after a
        timeout or while the first is still being handled (409), until the
        answer comes; nothing is created twice."""
        key = {"Idempotency-Key": uuid.uuid4().hex}
        end = time.monotonic() + deadline
        while True:
            try:
                r = self.request("POST", "/tasks", server=server, json=bodies, headers=key)
            except requests.Timeout:
                if time.monotonic() > end:
                    raise
                continue
            if r.status_code != 409 or time.monotonic() > end:
                break
            time.sleep(1)
        assert r.status_code == 201, r.text[:2000]
        body = r.json()
        return [item["_id"] for item in body["_items"]] if "_items" in body else [body["_id"]]

    def all_tasks(self):
        return read_all_tasks(self.request, dict(TASK_FIELDS, pending_parents=1, name=1))

    def unfinished(self):
        return self.request(
            "GET",
            "/tasks",
            params={"max_results": 1, "where": json.dumps({"state": {"$nin": ["terminated", "cancelled"]}})},
        ).json()["_meta"]["total"]

    def finished(self):
        return self.request(
            "GET", "/tasks", params={"max_results": 1, "where": json.dumps({"state": "terminated"})}
        ).json()["_meta"]["total"]

    def stop(self):
        for server in self.servers:
            server.stop()
        self.http.close()

    def errors(self):
        return [line for server in self.servers for line in server.server_errors()]


class Editor(threading.Thread):
    """Adds and removes continuations among a set of inactive tasks, each
    request through another server."""

    def __init__(self, servers, ids, seed, rounds):
        super().__init__(daemon=True)
        self.servers, self.ids, self.rng, self.rounds = servers, ids, random.Random(seed), rounds
        self.answers = {}
        self.error = None

    def run(self):
        try:
            for _ in range(self.rounds):
                parent, child = self.rng.sample(self.ids, 2)
                kind = self.rng.choice(["add_continuations", "remove_continuations"])
                r = self.servers.request("POST", "/tasks/%s/%s" % (parent, kind), json=[child])
                # a refusal (a cycle: 422) is an answer; nothing else may fail
                assert r.status_code in (200, 201, 204, 409, 422), (kind, r.status_code, r.text[:500])
                self.answers[r.status_code] = self.answers.get(r.status_code, 0) + 1
        except BaseException as e:  # reported by the test
            self.error = e


def find_cycle(edges):
    """A cycle in {node: [children]}, or None."""
    state = {}

    def visit(node, path):
        state[node] = 1
        for child in edges.get(node, []):
            if state.get(child) == 1:
                return path + [child]
            if child not in state:
                found = visit(child, path + [child])
                if found:
                    return found
        state[node] = 2
        return None

    for node in edges:
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_three_servers_one_database_with_a_server_killed(tmp_path):
    """3 servers, 4 workers spread over them, 2,000 tasks (graphs included),
    continuations edited concurrently through different servers, one server
    SIGKILLed mid-run and restarted: none lost, none run twice, every task
    ends as the rules say."""
    rng = random.Random(14)
    markers = tmp_path / "markers"
    markers.mkdir()
    servers = Servers(tmp_path)
    workers = [
        Worker(
            servers.url(i),
            tmp_path / ("work%d" % i),
            tmp_path / ("worker%d.log" % i),
            cores=2,
            heartbeat=WORKER_HEARTBEAT,
            timeout=HEARTBEAT_TIMEOUT,
            prefetch=PREFETCH,
            host="w%d" % i,
        ).start()
        for i in range(4)
    ]
    started = time.monotonic()
    try:
        # The editable group: inactive tasks whose continuations change under
        # concurrent edits through every server; made available at the end.
        # Each also waits for an anchor, so that none is released while the
        # edits run: a task whose last parent is removed becomes available
        # (the rule `test_remove_continuations_unlinks_and_releases_the_last`
        # shows), a worker would run it, and its success would settle the
        # edges the edits gave it, which the check below counts as pending.
        group = servers.submit([task_body(markers, 0, name="edit%d" % i, state="inactive") for i in range(24)])
        anchor = servers.submit(task_body(markers, 0, name="edit-anchor", state="inactive", continuations=group))[0]
        editors = [Editor(servers, group, seed, rounds=60) for seed in range(4)]
        for editor in editors:
            editor.start()
        levels, parents = graph_bodies(markers, 2000 - len(group), FAIL_PERCENT, rng)
        ids = submit_graph(servers, levels, chunk=25)  # each chunk through another server
        for editor in editors:
            editor.join(timeout=300)
            assert not editor.is_alive() and editor.error is None, editor.error
        # (deadlines for a stuck queue, not a speed goal: on a FerretDB shared
        # with other runs on 2 cores, 2,000 tasks took over 10 minutes)
        wait_for(lambda: servers.finished() >= 400, 600, "400 finished tasks")
        victim = servers.servers[1]
        victim.kill(signal.SIGKILL)
        servers.submit([task_body(markers, FAIL_PERCENT, name="while-down") for _ in range(50)], server=0)
        victim.start(timeout=120)  # (its first answer waits for a database busy with 4 workers)

        # The edited graph has no cycle, and each count matches its parents.
        tasks = servers.all_tasks()
        edges = {tid: [c for c in tasks[tid].get("continuations") or []] for tid in group}
        assert find_cycle(edges) is None, find_cycle(edges)
        group_parents = {tid: [anchor] + [p for p in group if tid in edges[p]] for tid in group}
        for tid in group:
            assert tasks[tid]["state"] == "inactive", (tid, tasks[tid]["state"])
            assert sorted(tasks[tid]["pending_parents"]) == sorted(group_parents[tid]), tid
            assert tasks[tid]["pending_dependency_count"] == len(group_parents[tid]), tid
        for tid in group + [anchor]:
            r = servers.request("PATCH", "/tasks/" + tid, json={"state": "available"})
            assert r.status_code == 200, r.text[:500]

        wait_for(lambda: servers.unfinished() == 0, 1500, "every task to finish")
        tasks = servers.all_tasks()
        workers_seen = servers.request("GET", "/workers").json()["_items"]
    finally:
        for worker in workers:
            worker.stop()
        servers.stop()
    seconds = time.monotonic() - started
    parents_of = dict(parents_by_id(ids, parents), **group_parents)
    _, duplicates, lost, problems = judge(
        markers, tasks, set(ids.values()) | set(group) | {anchor}, parents_of, strict=False
    )
    # a released continuation never ran before its parents ended
    for tid, ps in group_parents.items():
        if tasks[tid]["history"]:
            first = tasks[tid]["history"][0]["started"]
            for p in ps:
                assert tasks[p]["history"] and tasks[p]["history"][-1]["ended"] <= first, (p, tid)
    report(
        "3 servers, one database",
        lost,
        duplicates,
        problems,
        load="%d tasks on 3 servers, 4 workers x 2 slots, %d continuation edits"
        % (len(tasks), sum(e.rounds for e in editors)),
        faults="one server SIGKILLed mid-run and restarted",
        seconds=seconds,
    )
    assert sum(1 for w in workers_seen if w["state"] == "active") >= 4
    assert servers.errors() == []


def test_eight_claimers_over_three_servers_claim_each_task_once(tmp_path):
    # the claimers send no heartbeats: only their claims keep them alive
    servers = Servers(tmp_path, args=["--heartbeat-timeout", "300"])
    try:
        n = 2000
        for start in range(0, n, 500):
            servers.submit(
                [{"command": "true", "state": "available", "priority": i % 5} for i in range(start, start + 500)]
            )
        worker_ids = [
            servers.request("POST", "/workers", json={"host": "c%d" % i, "resources": {"cores": 64}}).json()["_id"]
            for i in range(8)
        ]
        claimed = {wid: [] for wid in worker_ids}
        errors = []

        def claimer(i, wid):
            try:
                while True:
                    r = servers.request(
                        "POST",
                        "/workers/%s/claim" % wid,
                        server=i,
                        json={"free": {"cores": 64, "memory": 0, "gpus": 0}, "max_tasks": 32},
                    )
                    assert r.status_code == 200, r.text[:500]
                    items = r.json()["_items"]
                    if not items:
                        return
                    claimed[wid] += [t["_id"] for t in items]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=claimer, args=(i, wid)) for i, wid in enumerate(worker_ids)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        everything = [tid for got in claimed.values() for tid in got]
        assert len(everything) == n and len(set(everything)) == n
        assert all(claimed.values()), "every claimer got some"
        tasks = servers.all_tasks()
        for wid, got in claimed.items():
            for tid in got:
                history = tasks[tid]["history"]
                assert tasks[tid]["state"] == "running" and len(history) == 1 and history[0]["worker"] == wid
    finally:
        servers.stop()
    assert servers.errors() == []


def test_a_token_revoked_through_one_server_is_refused_by_all(tmp_path):
    servers = Servers(tmp_path, n=2)
    try:
        made = servers.request("POST", "/tokens", server=0, json={"role": "user", "name": "alice"}).json()
        alice = {"Authorization": "Bearer " + made["token"]}
        for i in (0, 1):
            assert requests.get(servers.url(i) + "/tasks", headers=alice, timeout=10).status_code == 200
        assert servers.request("DELETE", "/tokens/" + made["_id"], server=1).status_code in (200, 204)
        for i in (0, 1):
            assert requests.get(servers.url(i) + "/tasks", headers=alice, timeout=10).status_code == 401
    finally:
        servers.stop()
    assert servers.errors() == []


def test_a_long_poll_in_one_server_sees_a_task_made_ready_in_another(tmp_path):
    """A claim waiting in server A gets a task made available through server
    B, within the re-check interval (measured by bench/bench_servers.py)."""
    servers = Servers(tmp_path, n=2)
    try:
        wid = servers.request("POST", "/workers", server=0, json={"host": "n", "resources": {"cores": 1}}).json()["_id"]
        task = servers.submit({"command": "true"}, server=1)[0]
        answer = {}

        def claim():
            answer["r"] = servers.request(
                "POST", "/workers/%s/claim" % wid, server=0, json={"free": {"cores": 1}, "max_tasks": 1, "wait": 20}
            )

        waiter = threading.Thread(target=claim)
        waiter.start()
        assert servers.request("PATCH", "/tasks/" + task, server=1, json={"state": "available"}).status_code == 200
        waiter.join(timeout=30)
        assert [t["_id"] for t in answer["r"].json()["_items"]] == [task]
    finally:
        servers.stop()
    assert servers.errors() == []
