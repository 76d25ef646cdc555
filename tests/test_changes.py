"""`GET /changes`: the dashboard's long poll, answered when what the caller
sees changes (a task written, a worker registered or lost), held otherwise."""

import conftest
from bson import ObjectId
from conftest import make_app
from conftest import patch_task as patch
from test_claims import register, submit

from banyan.server import changes
from banyan.server.services import services


def poll(api, status=200, **params):
    r = api.get("/changes", query_string=params)
    assert r.status_code == status, r.json
    return r.json


def held(app, api, **params):
    """Start a poll in a thread; returns (thread, result) once the server holds it."""
    return conftest.held(lambda: poll(api, **params), lambda: services(app).changes_waiters.held)


def test_a_poll_answers_at_once_without_the_current_version_and_says_who_asks(api):
    first = poll(api)
    assert first["changed"] is True and isinstance(first["version"], str)
    assert first["caller"]["role"] == "admin"  # authentication off: everyone is an admin
    assert poll(api, since="not-a-version")["version"] == first["version"]
    same = poll(api, since=first["version"], timeout=0)
    assert same["changed"] is False and same["version"] == first["version"]


def test_a_held_poll_answers_when_a_task_changes_and_after_its_timeout_otherwise(store):
    app = make_app(store, CHANGES_RECHECK_INTERVAL=0.05)
    api = app.test_client()
    (tid,) = submit(api, {"command": "true"})
    version = poll(api)["version"]
    quiet = poll(api, since=version, timeout=0.3)
    assert (quiet["changed"], quiet["version"]) == (False, version)

    thread, result = held(app, api, since=version, timeout=20)
    patch(api, tid, {"priority": 5})
    thread.join(20)
    assert result["reply"]["changed"] is True and result["reply"]["version"] != version
    # A second change within the same clock tick still makes a new version.
    after = result["reply"]["version"]
    patch(api, tid, {"priority": 6})
    assert poll(api, since=after, timeout=0)["version"] != after


def test_a_worker_registration_changes_the_version(api):
    version = poll(api)["version"]
    register(api, host="node-x")
    assert poll(api, since=version, timeout=0)["changed"] is True


def test_a_users_version_ignores_other_users_tasks(api, db):
    alice, bob = submit(api, {"command": "true"}, {"command": "true"})
    db.tasks.update_one({"_id": ObjectId(alice)}, {"$set": {"owner": "alice"}})
    db.tasks.update_one({"_id": ObjectId(bob)}, {"$set": {"owner": "bob"}})
    before = changes.version(db, {"owner": "alice"})
    patch(api, bob, {"priority": 3})
    assert changes.version(db, {"owner": "alice"}) == before
    patch(api, alice, {"priority": 3})
    assert changes.version(db, {"owner": "alice"}) != before


def test_a_bad_timeout_is_refused(api):
    for value in ("-1", "soon", "nan", "inf"):
        assert "timeout" in poll(api, status=400, timeout=value)["_error"]["message"]
