"""Issue 21 through a live server and the real `banyan` command: retried
submissions (a TCP proxy that loses answers), connection mistakes, units."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import TEST_TOKEN, CheckedSession

from banyan.client import Client, ServerUnreachable

BIN = os.path.dirname(sys.executable)
BANYAN = (
    [os.path.join(BIN, "banyan")]
    if os.path.exists(os.path.join(BIN, "banyan"))
    else [sys.executable, "-m", "banyan.cli"]
)


class AnswerLosingProxy:
    """Forwards each connection to `upstream`; for the first `lose`
    connections, once the server starts answering (so it has acted: its
    answer is built whole before the first byte leaves) the client's
    connection is closed instead, as when a server or network dies then."""

    def __init__(self, upstream_port, lose):
        self.upstream_port = upstream_port
        self.lose = lose
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            losing = self.connections <= self.lose
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, losing), daemon=True).start()

    @staticmethod
    def _pump(src, dst, losing):
        try:
            while True:
                data = src.recv(65536)
                if not data or losing:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def count(http, url, name):
    reply = http.get(url + "/tasks", params={"where": json.dumps({"name": name})}).json()
    return reply["_meta"]["total"]


def test_a_keyed_post_is_done_once_and_answered_the_same(live_server):
    http = CheckedSession()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = [{"command": "true", "name": "once"}, {"command": "true", "name": "once"}]
    first = http.post(live_server.url + "/tasks", json=body, headers=key)
    assert first.status_code == 201
    again = http.post(live_server.url + "/tasks", json=body, headers=key)
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count(http, live_server.url, "once") == 2
    # the same key with another body is a mistake, and creates nothing
    other = http.post(live_server.url + "/tasks", json={"command": "false", "name": "once"}, headers=key)
    assert other.status_code == 422 and "different request body" in other.json()["_error"]["message"]
    # a refused request leaves its key free for the corrected one
    key2 = {"Idempotency-Key": str(uuid.uuid4())}
    bad = http.post(
        live_server.url + "/tasks", json={"command": "true", "name": "fixed", "priority": "high"}, headers=key2
    )
    assert bad.status_code == 422
    good = http.post(live_server.url + "/tasks", json={"command": "true", "name": "fixed"}, headers=key2)
    assert good.status_code == 201 and "Idempotent-Replayed" not in good.headers
    assert count(http, live_server.url, "once") == 2 and count(http, live_server.url, "fixed") == 1
    assert http.post(live_server.url + "/tasks", json={}, headers={"Idempotency-Key": "x" * 300}).status_code == 400


def test_a_submission_whose_answer_was_lost_is_retried_and_creates_one_set(live_server):
    proxy = AnswerLosingProxy(live_server.port, lose=1)
    try:
        with Client(proxy.url, TEST_TOKEN, attempts=3, backoff=0.05) as client:
            ids = client.create_tasks([{"command": "true", "name": "lost-answer"} for _ in range(3)])
    finally:
        proxy.close()
    assert proxy.connections == 2  # the lost answer, then the retry
    http = CheckedSession()
    stored = http.get(live_server.url + "/tasks", params={"where": json.dumps({"name": "lost-answer"})}).json()
    assert sorted(t["_id"] for t in stored["_items"]) == sorted(ids)
    assert len(ids) == 3


@pytest.mark.slow
def test_an_unknown_outcome_is_reported_as_maybe_accepted(live_server, tmp_path):
    proxy = AnswerLosingProxy(live_server.port, lose=100)
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("BANYAN_TOKEN", "BANYAN_TEST_MONGO_URI") or not k.startswith("BANYAN_")
    }
    env.update(HOME=str(tmp_path))
    try:
        result = subprocess.run(
            BANYAN + ["submit", "--server", proxy.url, "--name", "unknown", "--", "true"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        proxy.close()
    assert result.returncode == 3, result.stderr
    assert "may have been accepted" in result.stderr and "banyan ls" in result.stderr, result.stderr
    assert "cannot reach" not in result.stderr
    # every retry carried the same key: one job (or one task) made, not one per try
    http = CheckedSession()
    jobs = http.get(live_server.url + "/jobs", params={"where": json.dumps({"name": "unknown"})}).json()["_meta"][
        "total"
    ]
    assert (jobs, count(http, live_server.url, "unknown")) in ((1, 0), (1, 1), (0, 1)), jobs


@pytest.mark.slow
def test_https_to_an_http_server_fails_at_once_with_the_fix(live_server, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("BANYAN_TOKEN", "BANYAN_TEST_MONGO_URI") or not k.startswith("BANYAN_")
    }
    env.update(HOME=str(tmp_path))
    wrong = live_server.url.replace("http://", "https://")
    started = time.monotonic()
    with pytest.raises(ServerUnreachable) as caught:
        Client(wrong, TEST_TOKEN).list_tasks()
    assert time.monotonic() - started < 2
    assert live_server.url in caught.value.reason
    started = time.monotonic()
    result = subprocess.run(BANYAN + ["ls", "--server", wrong], capture_output=True, text=True, env=env, timeout=60)
    # (the 2 s bound is the probe's; starting Python is the rest)
    assert result.returncode == 3
    assert "speaks http, not https" in result.stderr and "--server %s" % live_server.url in result.stderr, result.stderr


def test_a_server_url_naming_an_endpoint_is_explained(live_server, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("BANYAN_TOKEN", "BANYAN_TEST_MONGO_URI") or not k.startswith("BANYAN_")
    }
    env.update(HOME=str(tmp_path))
    for url in (live_server.url + "/tasks", live_server.url + "/workers/", live_server.url + "?x=1"):
        result = subprocess.run(BANYAN + ["ls", "--server", url], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "names an endpoint" in result.stderr and live_server.url in result.stderr, result.stderr


def banyan(*args, home, timeout=60):
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("BANYAN_TOKEN", "BANYAN_TEST_MONGO_URI") or not k.startswith("BANYAN_")
    }
    env.update(HOME=str(home), BANYAN_SERVER="http://127.0.0.1:9")  # never reached: refused first
    return subprocess.run(BANYAN + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--memory", "2Gb"], "lower-case 'b' means bits; for bytes write 2 GB (powers of 1000) or 2 GiB"),
        (["--memory", "2 gib"], "lower-case 'b' means bits"),
        (["--time-limit", "0"], "--time-limit must be more than 0 seconds"),
        (["--time-limit", "-5s"], "must not be negative"),
        (["--time-limit", "-1"], "must not be negative"),
    ],
)
def test_submit_refuses_bits_and_limits_that_are_not_positive(tmp_path, flags, message):
    result = banyan("submit", *flags, "--", "true", home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert "expected one argument" not in result.stderr


def test_graph_files_read_sizes_and_limits_the_same_way(tmp_path):
    for body, message in (
        ("memory: 2Gb", "means bits"),
        ("time_limit: 0", "more than 0 seconds"),
        ("time_limit: -3", "must not be negative"),
    ):
        path = tmp_path / "graph.yaml"
        path.write_text("tasks:\n  a:\n    command: 'true'\n    %s\n" % body)
        result = banyan("submit", "--file", path, home=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (body, result.stderr)


@pytest.mark.slow
def test_up_on_another_port_prints_how_to_reach_it(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("BANYAN_TOKEN", "BANYAN_TEST_MONGO_URI") or not k.startswith("BANYAN_")
    }
    env.update(HOME=str(tmp_path))
    up = subprocess.Popen(
        BANYAN + ["up", "--port", "0", "--data-dir", tmp_path / "data", "--cores", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        url = re.search(r"listening on (http://\S+)", up.stdout.readline()).group(1)
        hint = up.stdout.readline()
        assert "BANYAN_SERVER=%s banyan submit" % url in hint, hint
        # the hint works as printed
        result = subprocess.run(
            BANYAN + ["ls"], capture_output=True, text=True, timeout=60, env=dict(env, BANYAN_SERVER=url)
        )
        assert result.returncode == 0, result.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)


def test_a_claim_answer_for_a_registration_given_up_is_handed_back_at_once(live_server, tmp_path):
    """The worker gives up its registration (server unreachable, say) while
    its claim is in flight; the answer then brings a task claimed under the
    old registration. The task goes back to the queue at once, with no retry
    used, instead of waiting to be abandoned as unconfirmed."""
    from banyan.worker.worker import Worker, WorkerConfig

    worker = Worker(
        WorkerConfig(
            server=live_server.url,
            token=TEST_TOKEN,
            cores=1,
            memory=1 << 30,
            gpus=0,
            work_dir=str(tmp_path / "work"),
            claim_wait=20,
        )
    )
    worker.register()
    old = worker.worker_id
    http = CheckedSession()
    task_id = http.post(live_server.url + "/tasks", json={"command": "true", "state": "available"}).json()["_id"]
    claim = worker.claimer.client.claim

    def claim_then_give_up(*args, **kwargs):
        answer = claim(*args, **kwargs)
        assert [t["_id"] for t in answer["_items"]] == [task_id]
        worker.reset("test: gave up the registration while the claim was in flight")
        return answer

    worker.claimer.client.claim = claim_then_give_up
    assert worker.claimer.claim_once(wait=5) == 0  # nothing kept by the worker
    task = http.get(live_server.url + "/tasks/" + task_id).json()
    assert task["state"] == "available" and task.get("worker") is None, task
    assert task["retry_count"] == 0
    assert [h["worker"] for h in task["history"]] == [old]
    assert task["history"][0]["exit_status"].startswith("abandoned")
    # and it is claimed again at once, under the new registration
    worker.register()
    worker.claimer.client.claim = claim
    assert worker.claimer.claim_once(wait=0) == 1
