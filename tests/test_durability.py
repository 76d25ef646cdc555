"""The embedded store keeps every acknowledged write: across kill -9 (also
in the middle of compaction or of a bulk write), on a full disk, and a
damaged journal refuses to start until `banyan store repair` salvages it."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import requests
from bson import ObjectId
from conftest import MONGO_URI, LiveServer
from test_store_files import fill, small_tmpfs

from banyan.store import journal

embedded_only = pytest.mark.skipif(bool(MONGO_URI), reason="about the embedded store's files")
BANYAN = [sys.executable, "-m", "banyan.cli"]


def _names(server, session=requests):
    """{name: _id} of every stored task."""
    r = session.get(server.url + "/tasks", params={"max_results": 10000, "projection": json.dumps({"name": 1})})
    assert r.status_code == 200, r.text
    return {t["name"]: t["_id"] for t in r.json()["_items"]}


@pytest.mark.slow
def test_acknowledged_posts_survive_sigkill(tmp_path, http):
    server = LiveServer(tmp_path / "data").start()
    sent = {}
    try:
        for i in range(200):
            body = {
                "name": "t%d" % i,
                "command": ["echo", str(i)],
                "priority": i % 7,
                "requested_resources": {"cores": 0.5, "memory": "%d MiB" % (i + 1)},
                "environment": {"I": str(i)},
                "state": "available" if i % 2 else "inactive",
            }
            r = http.post(server.url + "/tasks", json=body)
            assert r.status_code == 201, r.text
            sent[r.json()["_id"]] = body
    finally:
        server.kill(signal.SIGKILL)
    server.start()
    try:
        for tid, body in sent.items():
            r = http.get(server.url + "/tasks/" + tid)
            assert r.status_code == 200, (tid, r.text)
            task = r.json()
            i = int(body["name"][1:])
            assert task["name"] == body["name"]
            assert task["command"] == ["echo", str(i)]
            assert task["priority"] == i % 7
            assert task["requested_resources"] == {"cores": 0.5, "memory": (i + 1) * 1024**2, "gpus": 0}
            assert task["environment"] == {"I": str(i)}
            assert task["state"] == body["state"]
        total = http.get(server.url + "/tasks", params={"max_results": 1}).json()["_meta"]["total"]
        assert total == 200
    finally:
        server.stop()
    assert server.server_errors() == []


@embedded_only
@pytest.mark.slow
def test_disk_full_answers_507_changes_nothing_and_service_resumes(tmp_path):
    with small_tmpfs(tmp_path / "fs", "8m") as fs:
        server = LiveServer(fs).start()  # its log is beside the tmpfs, not in it
        s = requests.Session()
        try:
            kept = s.post(server.url + "/tasks", json={"name": "kept", "command": ["true"], "state": "inactive"})
            assert kept.status_code == 201, kept.text
            kept = kept.json()["_id"]
            filler = fill(fs, 256 * 1024)
            acked, refused = {"kept"}, None
            for i in range(3000):
                r = s.post(
                    server.url + "/tasks",
                    json={"name": "t%d" % i, "command": ["echo", "x" * 2000], "state": "inactive"},
                )
                if r.status_code != 201:
                    refused = ("t%d" % i, r)
                    break
                acked.add("t%d" % i)
            assert refused is not None, "the disk never filled"
            name, r = refused
            assert r.status_code == 507, r.text
            assert "out of disk space" in r.json()["_error"]["message"] and "ENOSPC" in r.json()["_error"]["message"]
            assert set(_names(server, s)) == acked  # the refused task is nowhere
            big = s.patch(server.url + "/tasks/" + kept, json={"environment": {"BIG": "y" * 400000}})
            assert big.status_code == 507, big.text
            assert s.get(server.url + "/tasks/" + kept).json().get("environment", {}) == {}
            # space back: the server serves again by itself
            os.remove(filler)
            r = s.post(server.url + "/tasks", json={"name": "after", "command": ["true"], "state": "inactive"})
            assert r.status_code == 201, r.text
            acked.add("after")
            # restart on a full disk: start-up compaction has no room, and the server starts anyway
            fill(fs, 16 * 1024)
            server.kill(signal.SIGKILL)
            server.start()
            assert set(_names(server, s)) == acked
        finally:
            server.stop()
        assert server.server_errors() == []


def _damage_middle_record(path):
    """Flip one byte in the middle record of a journal; returns (offset,
    ids of documents that no other record holds)."""
    scan = journal.read(path)
    start, end, actions = scan.records[len(scan.records) // 2]
    with open(path, "r+b") as f:
        f.seek((start + end) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))

    def ids(acts):
        return {str(d["_id"]) for a in acts if a.get("o") == "p" for d in a["docs"]}

    elsewhere = set().union(*(ids(a) for s, _, a in scan.records if s != start))
    return start, ids(actions) - elsewhere


@embedded_only
@pytest.mark.slow
def test_a_flipped_byte_refuses_start_and_repair_salvages_the_rest(tmp_path, http):
    data = tmp_path / "data"
    server = LiveServer(data).start()
    posted = []
    try:
        for i in range(60):
            r = http.post(server.url + "/tasks", json={"name": "t%d" % i, "command": ["true"]})
            posted.append(r.json()["_id"])
    finally:
        server.kill(signal.SIGKILL)
    path = os.path.join(str(data), journal.JOURNAL)
    offset, lost = _damage_middle_record(path)
    refused = subprocess.run(
        BANYAN + ["server", "--port", "0", "--data-dir", str(data)], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1
    assert path in refused.stderr and "offset %d" % offset in refused.stderr
    assert "banyan store repair %s" % data in refused.stderr
    repair = subprocess.run(BANYAN + ["store", "repair", str(data)], capture_output=True, text=True, timeout=120)
    assert repair.returncode == 0, repair.stderr
    assert "could not salvage" in repair.stdout and "offset %d" % offset in repair.stdout
    server.start()
    try:
        stored = set(_names(server, http).values())
        assert stored == set(posted) - lost and len(lost) <= 1
    finally:
        server.stop()
    assert server.server_errors() == []


class _BulkWriter(threading.Thread):
    """POSTs batches of tasks until the server goes away; keeps the batches
    it got a 201 for."""

    def __init__(self, url, tag, size=20):
        super().__init__(daemon=True)
        self.url, self.tag, self.size = url, tag, size
        self.acked, self.sent = [], []

    def run(self):
        s = requests.Session()
        n = 0
        while True:
            batch = ["%s-%d-%d" % (self.tag, n, i) for i in range(self.size)]
            self.sent.append(batch)
            try:
                r = s.post(
                    self.url + "/tasks", json=[{"name": b, "command": ["echo", b * 20]} for b in batch], timeout=60
                )
            except requests.RequestException:
                return
            if r.status_code != 201:
                return
            self.acked.append(batch)
            n += 1


@embedded_only
@pytest.mark.slow
def test_kill_9_during_compaction_and_bulk_writes_loses_no_acknowledged_write(tmp_path):
    """Compaction runs every 64 KiB of journal here; round 0 is killed the
    moment a compaction's snapshot file appears, the others at random."""
    data = tmp_path / "data"
    server = LiveServer(data, env={"BANYAN_STORE_COMPACT_BYTES": str(64 * 1024)})
    rng = random.Random(os.environ.get("BANYAN_TEST_SEED", 7))
    tmp_snapshot = os.path.join(str(data), journal.SNAPSHOT + ".tmp")
    acked, sent = [], []
    for round_ in range(4):
        server.start()
        writers = [_BulkWriter(server.url, "r%dw%d" % (round_, w)) for w in range(2)]
        for w in writers:
            w.start()
        deadline = time.monotonic() + 30
        if round_ == 0:
            while not os.path.exists(tmp_snapshot) and time.monotonic() < deadline:
                time.sleep(0.0005)
            assert os.path.exists(tmp_snapshot), "no compaction seen"
        else:
            until = time.monotonic() + rng.uniform(0.3, 2.0)
            while time.monotonic() < until:
                time.sleep(0.01)
        server.kill(signal.SIGKILL)
        for w in writers:
            w.join(timeout=60)
            acked += w.acked
            sent += w.sent
    server.start()
    try:
        stored = _names(server)
        for batch in acked:
            assert all(name in stored for name in batch), batch
        for batch in sent:  # a batch is all there or not at all
            assert sum(name in stored for name in batch) in (0, len(batch)), batch
        assert len(acked) >= 8
    finally:
        server.stop()
    assert server.server_errors() == []


def _fill_store(data_dir, n):
    """n tasks written straight into a fresh embedded store (quicker than
    n POSTs), shaped like the server's: half finished with a history."""
    from banyan.server.app import create_app
    from banyan.server.states import utcnow
    from banyan.server.store import connect

    client = connect(data_dir=str(data_dir))
    try:
        app = create_app(client, {"MONGO_DBNAME": "banyan"})
        model = app.test_client().post("/tasks", json={"name": "model", "command": ["true"]}).json
        tasks = client["banyan"]["tasks"]
        model = tasks.find_one({"_id": ObjectId(model["_id"])})
        now, docs = utcnow(), []
        for i in range(n - 1):
            doc = dict(model, _id=ObjectId(), name="task %d" % i, command=["echo", str(i)])
            if i % 2:
                doc.update(
                    state="terminated",
                    exit_status="success",
                    history=[
                        {
                            "worker": ObjectId(),
                            "started": now - timedelta(seconds=90),
                            "ended": now,
                            "exit_status": "success",
                            "exit_code": 0,
                            "runtime": 90.0,
                        }
                    ],
                    queue_wait=1.5,
                )
            docs.append(doc)
        tasks.insert_many(docs)
    finally:
        client.close()


@embedded_only
@pytest.mark.slow
def test_long_scans_do_not_hold_up_single_task_requests(tmp_path):
    """One client loops long reads over 20,000 tasks (a `$nin` filter with a
    sort on an unindexed field, and `/stats` aggregations); another reads and
    writes single tasks meanwhile. Its requests go through while each long
    read runs, instead of waiting for its end: the store holds its lock for
    a slice of a scan at a time. (The latencies are figures for
    bench/bench_store_scale.py, not for a test.)"""
    data = tmp_path / "data"
    _fill_store(data, 20000)
    server = LiveServer(data).start()
    stop, long_reads, scans = threading.Event(), [], []

    def scanner():
        s = requests.Session()
        params = {
            "where": json.dumps({"state": {"$nin": ["cancelled"]}}),
            "sort": '[["command", -1]]',
            "max_results": 20,
        }
        while not stop.is_set():
            for path, query in (("/tasks", params), ("/stats", None)):
                started = time.monotonic()
                r = s.get(server.url + path, params=query)
                (scans if path == "/tasks" else long_reads).append((started, time.monotonic()))
                assert r.status_code == 200, r.text
                assert path != "/tasks" or r.json()["_meta"]["total"] == 20001

    s = requests.Session()
    try:
        tid = s.post(server.url + "/tasks", json={"name": "mine", "command": ["true"], "state": "inactive"}).json()[
            "_id"
        ]
        thread = threading.Thread(target=scanner, daemon=True)
        thread.start()
        requests_done, priority = [], None
        deadline = time.monotonic() + 300
        while len(scans) < 4 and time.monotonic() < deadline:
            started = time.monotonic()
            if len(requests_done) % 2:
                priority = len(requests_done)
                r = s.patch(server.url + "/tasks/" + tid, json={"priority": priority})
            else:
                r = s.get(server.url + "/tasks/" + tid)
            assert r.status_code == 200, r.text
            requests_done.append((started, time.monotonic()))
        stop.set()
        thread.join(timeout=120)
        assert len(scans) >= 4 and long_reads, "the long reads did not run"
        # Requests that began and ended inside one scan (a count and a
        # sorted find over every task: two calls of the store, each of which
        # would hold everyone up for its whole length if it ran in one go)
        inside = [sum(1 for a, b in requests_done if start < a and b < end) for start, end in scans]
        assert sorted(inside)[len(inside) // 2] >= 8, inside
        assert s.get(server.url + "/tasks/" + tid).json()["priority"] == priority
    finally:
        stop.set()
        server.stop()
    assert server.server_errors() == []


@embedded_only
@pytest.mark.slow
def test_a_write_during_compaction_is_acknowledged_and_survives_kill_9(tmp_path):
    """Compaction writes its snapshot without holding the store: a POST
    sent while a compaction's snapshot file is being written is answered
    before that file is done (its record goes to a new journal segment),
    and a kill -9 right after loses nothing."""
    data = tmp_path / "data"
    _fill_store(data, 6000)  # a snapshot of several MiB: written by a thread, for a while
    server = LiveServer(data, embedded=True, env={"BANYAN_STORE_COMPACT_BYTES": str(256 * 1024)}).start()
    tmp_snapshot = os.path.join(str(data), journal.SNAPSHOT + ".tmp")
    s = requests.Session()
    acked, during = [], None
    try:
        deadline = time.monotonic() + 120
        while during is None and time.monotonic() < deadline:
            try:
                writing = os.stat(tmp_snapshot).st_ino
            except FileNotFoundError:
                writing = None
            name = "t%d" % len(acked)
            r = s.post(server.url + "/tasks", json={"name": name, "command": ["echo", name], "state": "inactive"})
            assert r.status_code == 201, r.text
            acked.append((name, r.json()["_id"]))
            with contextlib.suppress(FileNotFoundError):
                if writing is not None and os.stat(tmp_snapshot).st_ino == writing:
                    during = acked[-1]  # sent and answered while one snapshot was being written
    finally:
        server.kill(signal.SIGKILL)
    assert during is not None, "no write answered during a compaction"
    server.start()
    try:
        r = s.get(server.url + "/tasks/" + during[1])
        assert r.status_code == 200 and r.json()["name"] == during[0], r.text
        stored = _names(server)
        assert all(stored.get(name) == tid for name, tid in acked)
        assert len(stored) == 6000 + len(acked)
    finally:
        server.stop()
    assert server.server_errors() == []
