"""`GET /changes`: a long poll that answers when what a caller sees changes.

    GET /changes?since=VERSION&timeout=20
        -> 200 {"version": "...", "changed": true, "caller": {"role", "name"}}

The dashboard follows the queue with it instead of re-reading everything
every few seconds. A *version* is a fingerprint of what the caller may see,
read from the store (so it is right with several server processes over one
database, and needs no change stream): the latest `_updated` of the
caller's tasks, the `_etag`s of the tasks updated at that instant (two
changes within one clock tick still differ), and the state of every worker
registration. Any change to a task sets its `_updated` to now, so it moves
the first or changes the second.

Without `since`, or with a `since` that is not the current version, the
answer is immediate. Otherwise the request is held, looking again every
`CHANGES_RECHECK_INTERVAL` seconds (an indexed read of the few tasks
updated last), or four times as long as a look took if that is more, until
the version moves or `timeout` (at most `CHANGES_MAX_TIMEOUT`) passes;
then `changed` is false. When `CHANGES_MAX_WAITERS` polls are already held in this process, the answer is
immediate, with `retry_after` seconds for the client to pace itself.
`caller` says whose token asked (role and name), so the page offers only
the actions that token may take.
"""

import hashlib
import threading
import time

from eve.utils import date_to_str
from flask import Blueprint, abort, current_app, request

from banyan.server import auth
from banyan.server.identity import current_identity
from banyan.server.services import services

#: Tasks updated at the latest instant that go into a version (a bulk write
#: stamps thousands alike; past this many, a change to one of the others at that
#: same instant shows at the next change, or the page's periodic re-read).
ETAGS_PER_VERSION = 50

blueprint = Blueprint("changes", __name__)


class Waiters:
    """How many polls this process holds open (a bound on request threads,
    not a guard on any data), and the server's stop, which ends them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.held = 0
        self._stopping = threading.Event()

    def enter(self, limit):
        with self._lock:
            if self.held >= limit or self._stopping.is_set():
                return False
            self.held += 1
            return True

    def release_all(self):
        """The server stops: held polls answer at once, none is held anew,
        so that none reads the store after it is closed."""
        self._stopping.set()

    def pause(self, seconds):
        """Sleep `seconds`, or less if the server stops; True if it stops."""
        return self._stopping.wait(seconds)

    def leave(self):
        with self._lock:
            self.held -= 1


def version(db, visible):
    """The fingerprint of the tasks `visible` selects and of the workers:
    one read of the latest-updated tasks (newest first, ties by id, so the
    same tasks come back while nothing changes) and one of the workers."""
    digest = hashlib.sha256()
    latest = list(
        db["tasks"]
        .find(visible, {"_updated": 1, "_etag": 1})
        .sort([("_updated", -1), ("_id", -1)])
        .limit(ETAGS_PER_VERSION)
    )
    if latest:
        stamp = latest[0].get("_updated")
        etags = [str(doc["_id"]) + str(doc.get("_etag")) for doc in latest if doc.get("_updated") == stamp]
        digest.update(("%s|%d|" % (date_to_str(stamp) if stamp else "", len(etags))).encode())
        digest.update("|".join(etags).encode())
    for worker in db["workers"].find({}, {"state": 1}).sort("_id", 1):
        digest.update(("%s=%s;" % (worker["_id"], worker.get("state"))).encode())
    return digest.hexdigest()[:32]


@blueprint.route("/changes", methods=["GET"])
@auth.require_role("admin", "user", "worker")
def changes_view():
    config = current_app.config
    since = request.args.get("since")
    raw_timeout = request.args.get("timeout", str(config["CHANGES_MAX_TIMEOUT"]))
    try:
        timeout = float(raw_timeout)
    except ValueError:
        timeout = -1
    if not 0 <= timeout < float("inf"):
        abort(400, description="'timeout' must be a number of seconds >= 0, not %r" % raw_timeout[:100])
    timeout = min(timeout, config["CHANGES_MAX_TIMEOUT"])
    identity = current_identity()
    db = current_app.data.pymongo("tasks").db
    visible = auth.owner_filter()
    answer = {"caller": {"role": identity.role, "name": identity.name}}
    current = version(db, visible)
    if since != current or timeout == 0:
        return dict(answer, version=current, changed=since != current)
    waiters = services().changes_waiters
    if not waiters.enter(config["CHANGES_MAX_WAITERS"]):
        return dict(answer, version=current, changed=False, retry_after=config["CHANGES_RECHECK_INTERVAL"] * 10)
    try:
        deadline = time.monotonic() + timeout
        look = 0.0
        while current == since and time.monotonic() < deadline:
            # a look that takes long (a big queue on a store without range
            # indexes) is made less often: the poll spends at most ~1/5 of a core
            pause = max(config["CHANGES_RECHECK_INTERVAL"], 4 * look)
            if waiters.pause(min(pause, max(0.0, deadline - time.monotonic()))):
                break  # the server stops: answered as at the end of the timeout
            started = time.monotonic()
            current = version(db, visible)
            look = time.monotonic() - started
    finally:
        waiters.leave()
    return dict(answer, version=current, changed=current != since)


def init_app(app):
    services(app).changes_waiters = Waiters()
    app.register_blueprint(blueprint)
