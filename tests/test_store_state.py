"""The state a snapshot keeps beside the documents (banyan/store/state.py):
index entries, sequence numbers and built views. A restart loads it; a
state that does not match the documents, or cannot be read, is computed
again from them, and every document is there and found."""

import logging
import os
import pickle
import re
import signal
import time
from datetime import datetime, timedelta

import bson
import pytest
from bson import ObjectId
from conftest import CheckedSession, LiveServer
from test_durability import _fill_store, embedded_only

from banyan.server.store import EmbeddedClient
from banyan.store import journal, state

STATES = ("available", "running", "terminated")
COUNTS = [{"$match": {"v": {"$ne": None}}}, {"$project": {"state": 1}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}]
LARGEST = [{"$match": {"v": {"$ne": None}}}, {"$project": {"v": 1}}, {"$sort": {"v": -1}}, {"$limit": 3}]
LOADED = "loaded the indexes and views of banyan.tasks"
NOT_USED = "the indexes and views of banyan.tasks it holds are not used"


def _coll(client):
    return client["banyan"]["tasks"]


def _store_with_state(data, n=300):
    """A store whose snapshot holds the tasks collection's state: an index
    and two views, built before the last write (each write compacts)."""
    c = EmbeddedClient(data, compact_bytes=1)
    coll = _coll(c)
    coll.create_index([("state", 1), ("created", -1), ("_id", 1)], name="by_state")
    start = datetime(2026, 1, 1)
    coll.insert_many(
        [
            {"_id": ObjectId(), "state": STATES[i % 3], "created": start + timedelta(minutes=i % 50), "v": i}
            for i in range(n)
        ]
    )
    list(coll.aggregate(COUNTS))
    list(coll.aggregate(LARGEST))
    coll.insert_one({"_id": ObjectId(), "state": "running", "created": start, "v": n})  # compacts, views built
    c.close()


def _expected(client):
    """What the index and the views must answer, from a plain scan of
    every document (no index, no view)."""
    docs = list(_coll(client).find({}, {"_id": 1, "state": 1, "created": 1, "v": 1}))
    running = sorted(
        (d for d in docs if d["state"] == "running"), key=lambda d: (-d["created"].timestamp(), d["_id"].binary)
    )
    counts = {}
    for d in docs:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    largest = sorted((d["v"] for d in docs), reverse=True)[:3]
    return [d["_id"] for d in running], counts, largest


def _answers(client):
    coll = _coll(client)
    running = [d["_id"] for d in coll.find({"state": "running"}, sort=[("created", -1), ("_id", 1)])]
    counts = {row["_id"]: row["n"] for row in coll.aggregate(COUNTS)}
    largest = [row["v"] for row in coll.aggregate(LARGEST)]
    return running, counts, largest


def test_a_restart_loads_the_state_and_the_journal_changes_it(tmp_path, caplog):
    data = str(tmp_path / "data")
    _store_with_state(data)
    c = EmbeddedClient(data)  # loads the state; its changes go to the journal
    coll = _coll(c)
    assert coll._store.view_sets, "the views came back with the snapshot"  # pylint: disable=protected-access
    moved = coll.find_one({"state": "available"})
    coll.update_one({"_id": moved["_id"]}, {"$set": {"state": "running", "v": 10000}})
    coll.delete_one({"state": "terminated"})
    coll.insert_one({"_id": ObjectId(), "state": "running", "created": datetime(2027, 1, 1), "v": -1})
    assert _answers(c) == _expected(c)
    c.close()
    with caplog.at_level(logging.INFO, logger="banyan.store.engine"):
        c = EmbeddedClient(data)  # the snapshot's state, then the journal's changes one by one
    assert LOADED in caplog.text and NOT_USED not in caplog.text
    running, counts, largest = _answers(c)
    assert (running, counts, largest) == _expected(c)
    assert moved["_id"] in running and largest[0] == 10000 and sum(counts.values()) == 301
    c.close()


def _rewrite_snapshot(data, change):
    """Write the snapshot again, record by record, each through
    change(actions) (which returns the actions to write), with valid
    checksums: damage a checksum cannot see."""
    path = os.path.join(data, journal.SNAPSHOT)
    scan = journal.read(path)
    with open(path, "wb") as f:
        for _, _, actions in scan.records:
            f.write(journal.frame(change(actions)))


def test_a_state_that_does_not_match_the_documents_is_computed_again(tmp_path, caplog):
    """One task changed in the snapshot (its record valid), the state not:
    an index trusted as it is would not find it under its new state."""
    data = str(tmp_path / "data")
    _store_with_state(data)
    changed = []

    def change(actions):
        out = []
        for action in actions:
            if action.get("o") == "p" and action["c"] == "tasks" and not changed:
                docs = [bson.decode(d.raw) for d in action["docs"]]
                docs[0]["state"], docs[0]["v"] = "terminated", 5000
                changed.append(docs[0]["_id"])
                action = dict(action, docs=docs)
            out.append(action)
        return out

    _rewrite_snapshot(data, change)
    with caplog.at_level(logging.INFO, logger="banyan.store.engine"):
        c = EmbeddedClient(data)
    assert NOT_USED in caplog.text and "digest" in caplog.text and LOADED not in caplog.text
    assert _coll(c).count_documents({}) == 301
    assert _coll(c).find_one({"state": "terminated", "_id": changed[0]})["v"] == 5000
    assert _answers(c) == _expected(c)
    assert _answers(c)[2][0] == 5000
    c.close()


class _Planted:
    """What a state must never run: a pickle that calls a function."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_unreadable_state_is_computed_again_and_never_run(tmp_path, caplog):
    data = str(tmp_path / "data")
    _store_with_state(data)
    marker = str(tmp_path / "ran")

    def change(actions):
        if actions[0].get("o") == "state" and actions[0]["c"] == "tasks":
            return [dict(actions[0], state=pickle.dumps({"seqs": _Planted(marker)}))]
        return actions

    _rewrite_snapshot(data, change)
    with caplog.at_level(logging.INFO, logger="banyan.store.engine"):
        c = EmbeddedClient(data)
    assert NOT_USED in caplog.text and "not the store's" in caplog.text
    assert not os.path.exists(marker)
    assert _coll(c).count_documents({}) == 301
    assert _answers(c) == _expected(c)
    c.close()


def test_a_state_of_another_version_is_computed_again(tmp_path, caplog):
    data = str(tmp_path / "data")
    _store_with_state(data)
    _rewrite_snapshot(
        data, lambda actions: [dict(a, v=state.VERSION + 1) if a.get("o") == "state" else a for a in actions]
    )
    with caplog.at_level(logging.INFO, logger="banyan.store.engine"):
        c = EmbeddedClient(data)
    assert NOT_USED in caplog.text and "version" in caplog.text
    assert _answers(c) == _expected(c)
    c.close()


def test_views_built_since_the_snapshot_are_written_at_close(tmp_path, caplog):
    """The first `/stats` after a start builds its views (a pass over every
    task): closing writes them into a snapshot, so the next start has them."""
    data = str(tmp_path / "data")
    c = EmbeddedClient(data)
    coll = _coll(c)
    coll.insert_many([{"_id": i, "state": STATES[i % 3], "created": datetime(2026, 1, 1), "v": i} for i in range(30)])
    c.close()
    assert os.path.getsize(os.path.join(data, journal.JOURNAL)) > 0, "no views: closing leaves the journal"
    c = EmbeddedClient(data)
    assert not _coll(c)._store.view_sets  # pylint: disable=protected-access
    counts = list(_coll(c).aggregate(COUNTS))
    c.close()
    assert os.path.getsize(os.path.join(data, journal.JOURNAL)) == 0, "compacted at close"
    with caplog.at_level(logging.INFO, logger="banyan.store.engine"):
        c = EmbeddedClient(data)
    assert LOADED in caplog.text
    assert _coll(c)._store.view_sets  # pylint: disable=protected-access
    assert list(_coll(c).aggregate(COUNTS)) == counts
    assert {row["_id"]: row["n"] for row in counts} == {"available": 10, "running": 10, "terminated": 10}
    c.close()


@pytest.mark.slow
def test_sigterm_closes_the_server_cleanly_and_the_next_start_loads_the_views(tmp_path):
    """`kill` (SIGTERM, as a service manager stops a server) is a clean stop
    like Ctrl-C: the server exits 0 and its store's close writes the views
    the first `/stats` built into a snapshot, which the next start loads."""
    data = tmp_path / "data"
    server = LiveServer(data, embedded=True).start()
    http = CheckedSession()
    for i in range(30):
        assert http.post(server.url + "/tasks", json={"command": "echo %d" % i}).status_code == 201
    stats = http.get(server.url + "/stats").json()
    assert stats["total"] == 30
    server.kill(signal.SIGTERM)
    assert server.proc.returncode == 0
    assert os.path.getsize(data / journal.JOURNAL) == 0, "the close compacted the journal into a snapshot"
    saved = [
        actions[0]
        for _, _, actions in journal.read(str(data / journal.SNAPSHOT)).records
        if actions[0].get("o") == "state"
    ]
    assert ("banyan", "tasks") in {(a["d"], a["c"]) for a in saved}

    again = LiveServer(data, embedded=True, log_level="INFO").start()
    try:
        assert http.get(again.url + "/stats").json()["states"] == stats["states"]
    finally:
        again.stop()
    with open(str(data) + ".log", encoding="utf-8", errors="replace") as log:
        assert LOADED + " (30 documents)" in log.read()
    assert again.server_errors() == []


def _log_since(data, offset):
    with open(str(data) + ".log", encoding="utf-8", errors="replace") as log:
        log.seek(offset)
        return log.read()


def _log_size(data):
    path = str(data) + ".log"
    return os.path.getsize(path) if os.path.exists(path) else 0


def _built_views_in_snapshot(data):
    """How many built views the snapshot holds for banyan.tasks (0: none,
    or no snapshot)."""
    scan = journal.read(str(data / journal.SNAPSHOT))
    for _, _, actions in scan.records if scan else ():
        action = actions[0]
        if action.get("o") == "state" and (action["d"], action["c"]) == ("banyan", "tasks"):
            held = state.load(action, action["n"], action["digest"])
            return sum(len(built) for built in held["views"].values())
    return 0


def _wait_for(condition, what, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


@embedded_only
@pytest.mark.slow
def test_a_new_store_keeps_the_views_of_stats_from_its_first_start(tmp_path):
    """The server of a new store defines `/stats`' views at start, while the
    store is empty: the tasks posted after are added to them as they are
    written, and the first `/stats` builds nothing (building them inside
    that request took 10-25 s at 100,000 tasks)."""
    data = tmp_path / "data"
    server = LiveServer(data, embedded=True, log_level="INFO").start()
    http = CheckedSession()
    try:
        _wait_for(
            lambda: re.search(r"built \d+ views? of banyan.tasks from every document \(0\)", _log_since(data, 0)),
            "the views of the empty store",
        )
        r = http.post(server.url + "/tasks", json=[{"command": "echo %d" % i, "state": "available"} for i in range(40)])
        assert r.status_code == 201
        stats = http.get(server.url + "/stats").json()
        assert stats["total"] == 40 and stats["states"]["available"] == 40
    finally:
        server.stop()
    log = _log_since(data, 0)
    assert not re.search(r"views? of banyan.tasks from every document \([1-9]", log), log
    assert server.server_errors() == []


@embedded_only
@pytest.mark.slow
def test_after_kill_9_the_views_defined_before_are_built_at_start(tmp_path):
    """The views the first `/stats` defined go into the journal with the
    next write: a start after kill -9 (the snapshot predates them) builds
    them at once, in the background, and the first `/stats` is answered
    from them, not by building them."""
    data = tmp_path / "data"
    server = LiveServer(data, embedded=True, log_level="INFO").start()
    http = CheckedSession()
    for i in range(31):
        if i == 30:  # after the views were defined: its record carries their definitions
            assert http.get(server.url + "/stats").json()["total"] == 30
        r = http.post(server.url + "/tasks", json={"command": "echo %d" % i, "state": "available"})
        assert r.status_code == 201
    server.kill(signal.SIGKILL)

    offset = _log_size(data)
    server.start()
    try:
        _wait_for(lambda: re.search(r"built the [1-9]\d* views defined before", _log_since(data, offset)), "the views")
        stats = http.get(server.url + "/stats").json()
        assert stats["total"] == 31 and stats["states"]["available"] == 31
    finally:
        server.stop()
    log = _log_since(data, offset)
    assert re.search(r"built \d+ views? of banyan.tasks from every document \(31\), at start, in the background", log)
    assert "at the first read asking for it" not in log
    assert server.server_errors() == []


@embedded_only
@pytest.mark.slow
def test_after_kill_9_a_large_store_loads_its_views_from_the_snapshot(tmp_path):
    """A store large enough that building `/stats`' views is a long pass
    writes them into a snapshot (in the background) once the first
    `/stats` built them; after kill -9 the start loads them, the journal
    replayed over them keeps them current, and `/stats` builds nothing."""
    data = tmp_path / "data"
    _fill_store(data, 6000)
    server = LiveServer(data, embedded=True, log_level="INFO").start()
    http = CheckedSession()
    before = http.get(server.url + "/stats").json()
    assert before["total"] == 6000
    _wait_for(lambda: _built_views_in_snapshot(data) > 0, "a snapshot holding the views")
    r = http.post(server.url + "/tasks", json={"command": "echo after", "state": "available"})
    assert r.status_code == 201
    server.kill(signal.SIGKILL)

    offset = _log_size(data)
    server.start()
    try:
        stats = http.get(server.url + "/stats").json()
    finally:
        server.stop()
    assert stats["total"] == 6001
    assert stats["states"]["available"] == before["states"]["available"] + 1
    assert stats["attempts"] == before["attempts"] and stats["queue_wait"] == before["queue_wait"]
    log = _log_since(data, offset)
    assert "loaded the indexes and views of banyan.tasks" in log
    assert "from every document" not in log
    assert server.server_errors() == []


@pytest.mark.parametrize("blob", [b"", b"abc", bytes(range(256)) * 400, memoryview(b"xyz" * 1000)])
def test_a_state_record_written_in_pieces_is_the_record_frame_makes(blob):
    """A snapshot writes its state record in pieces (the state is not
    copied into it): the same bytes, hence the same checksum, as one
    record holding it."""
    action = {"o": "state", "d": "banyan", "c": "tasks", "v": state.VERSION, "n": 3, "digest": 12345}
    pieces = journal.frame_pieces(action, "state", blob)
    assert b"".join(bytes(piece) for piece in pieces) == journal.frame([dict(action, state=bytes(blob))])
    scan = journal.Scan("record", b"".join(bytes(piece) for piece in pieces))
    assert not scan.damage and scan.tail is None and scan.records[0][2][0]["state"] == bytes(blob)
