"""`banyan store archive` moves old finished tasks out of the live store into
compressed JSON lines, only those nothing unfinished depends on, and
`banyan ls --archive` lists them."""

import datetime
import gzip
import json
import os
import subprocess
import sys
import time

import pytest
import requests
from bson import ObjectId
from conftest import MONGO_URI, LiveServer

from banyan.server.store import EmbeddedClient
from banyan.store import journal

BANYAN = [sys.executable, "-m", "banyan.cli"]
UTC = datetime.timezone.utc
OLD = datetime.datetime(2026, 1, 1, tzinfo=UTC)
NEW = datetime.datetime(2026, 6, 1, tzinfo=UTC)


def _task(name, state, updated=OLD, continuations=()):
    return {
        "_id": ObjectId(),
        "name": name,
        "state": state,
        "_created": OLD,
        "_updated": updated,
        "continuations": list(continuations),
        "owner": "ann",
        "history": [{"worker": ObjectId(), "ended": updated, "exit_status": "success"}],
    }


def test_archive_moves_only_what_nothing_unfinished_depends_on(tmp_path):
    data = str(tmp_path / "data")
    running_child = _task("running child", "running")
    done_child = _task("done child", "terminated")
    t = {
        "alone": _task("alone", "terminated"),
        "cancelled": _task("cancelled", "cancelled"),
        "parent of running": _task("parent of running", "terminated", continuations=[running_child["_id"]]),
        "parent of done": _task("parent of done", "terminated", continuations=[done_child["_id"]]),
        "recent": _task("recent", "terminated", updated=NEW),
        "child of unfinished": _task("child of unfinished", "cancelled"),
    }
    unfinished_parent = _task("unfinished parent", "inactive", continuations=[t["child of unfinished"]["_id"]])
    c = EmbeddedClient(data)
    c["banyan"]["tasks"].insert_many(list(t.values()) + [running_child, done_child, unfinished_parent])
    c.close()
    with journal.locked(data):  # as a running server holds it
        busy = subprocess.run(
            BANYAN + ["store", "archive", "--before", "2026-03-01", data], capture_output=True, text=True, timeout=120
        )
    assert busy.returncode != 0 and "in use" in busy.stderr

    done = subprocess.run(
        BANYAN + ["store", "archive", "--before", "2026-03-01T00:00+00:00", data],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = {"alone", "cancelled", "parent of done", "done child"}
    assert "archived %d finished tasks" % len(expected) in done.stdout
    files = os.listdir(os.path.join(data, "archive"))
    assert len(files) == 1 and files[0].endswith(".jsonl.gz")
    with gzip.open(os.path.join(data, "archive", files[0]), "rt") as f:
        archived = [json.loads(line) for line in f]
    assert {d["name"] for d in archived} == expected
    alone = next(d for d in archived if d["name"] == "alone")
    assert alone["_id"] == str(t["alone"]["_id"]) and alone["_updated"] == "2026-01-01T00:00:00.000000Z"

    c = EmbeddedClient(data)
    left = {d["name"] for d in c["banyan"]["tasks"].find()}
    c.close()
    assert left == {"parent of running", "recent", "child of unfinished", "running child", "unfinished parent"}

    listed = subprocess.run(
        BANYAN + ["ls", "--archive", data, "--format", "name,raw_state"], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()) == sorted("%s\t%s" % (d["name"], d["state"]) for d in archived)
    cancelled = subprocess.run(
        BANYAN + ["ls", "--archive", data, "--state", "cancelled", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert [d["name"] for d in json.loads(cancelled.stdout)] == ["cancelled"]


@pytest.mark.skipif(bool(MONGO_URI), reason="the embedded store's archive")
@pytest.mark.slow
def test_the_server_archives_on_a_schedule(tmp_path):
    data = tmp_path / "data"
    server = LiveServer(data, extra_args=["--archive-after", "0", "--archive-every", "0.2"]).start()
    s = requests.Session()
    try:
        done = s.post(server.url + "/tasks", json={"name": "done", "command": ["true"], "state": "inactive"}).json()
        waiting = s.post(
            server.url + "/tasks", json={"name": "waiting", "command": ["true"], "state": "inactive"}
        ).json()
        assert s.patch(server.url + "/tasks/" + done["_id"], json={"state": "cancelled"}).status_code == 200
        deadline = time.monotonic() + 60
        while s.get(server.url + "/tasks/" + done["_id"]).status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.get(server.url + "/tasks/" + done["_id"]).status_code == 404
        assert s.get(server.url + "/tasks/" + waiting["_id"]).status_code == 200
    finally:
        server.stop()
    listed = subprocess.run(
        BANYAN + ["ls", "--archive", str(data), "--json"], capture_output=True, text=True, timeout=120
    )
    assert [(d["_id"], d["state"]) for d in json.loads(listed.stdout)] == [(done["_id"], "cancelled")]
    assert server.server_errors() == []
