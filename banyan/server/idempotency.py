"""`Idempotency-Key` on `POST /tasks` and `POST /jobs` (the IETF httpapi
draft's header): a submission retried after a lost answer creates nothing
twice.

The first request with a key stores a record `pending` before Eve creates
anything; its answer, once a 2xx, is stored in the record (`done`). The
same key again (same caller, same body) gets that first answer back, with
`Idempotent-Replayed: true`, and creates nothing:

- while the first is still being handled: 409, retry later;
- with another body: 422 (a key names one request);
- after a refused first request (4xx): the record is gone, so the
  corrected request may reuse the key (after a 5xx it stays `pending`).

Records live in the `idempotency_keys` collection, unique on (owner, key):
that unique index, not a lock, decides which of two server processes
handles a key. Each record carries `expires` (`IDEMPOTENCY_TTL` seconds,
at least a day); an expired record counts as absent and is deleted lazily
(a compare-and-delete on its `_id` and `expires`, then a periodic sweep
over the `expires` index). A record stays `pending` if its server died
half way; the key then answers 409 until it expires, so the client is told
to look (`banyan ls`) rather than risk a second set of tasks.
"""

import hashlib
import logging
import time
from datetime import timedelta

import pymongo.errors
from bson import ObjectId
from flask import abort, current_app, g, request

from banyan.protocol import ATTEMPT_ROLE
from banyan.server.identity import current_identity
from banyan.server.services import services
from banyan.server.states import utcnow
from banyan.server.store import aware

log = logging.getLogger(__name__)

KEYS = "idempotency_keys"
HEADER = "Idempotent-Replayed"
#: Longest key accepted (the draft leaves it to the server; UUIDs are 36).
MAX_KEY_LENGTH = 255
#: Seconds between sweeps of expired records, per server process.
SWEEP_INTERVAL = 600


class KeyStore:
    """The `idempotency_keys` collection: claim a key, finish it, drop it."""

    def __init__(self, db, ttl):
        self.keys = db[KEYS]
        self.ttl = float(ttl)
        self.keys.create_index([("owner", 1), ("key", 1)], unique=True, name="owner_key")
        self.keys.create_index([("expires", 1)], name="expires")
        self._swept = 0.0

    def claim(self, owner, key, fingerprint, now=None):
        """(None, None) if this request now owns `key`'s record (its `_id`
        second); else (the stored record, None)."""
        now = now or utcnow()
        self._sweep(now)
        for _ in range(2):
            record = {
                "_id": ObjectId(),
                "owner": owner,
                "key": key,
                "fingerprint": fingerprint,
                "state": "pending",
                "created": now,
                "expires": now + timedelta(seconds=self.ttl),
            }
            try:
                self.keys.insert_one(record)
                return None, record["_id"]
            except pymongo.errors.DuplicateKeyError:
                pass
            stored = self.keys.find_one({"owner": owner, "key": key})
            if stored is None:
                continue  # dropped meanwhile: try again
            if aware(stored["expires"]) > now:
                return stored, None
            # Expired: the key is free again (only this exact record is removed).
            self.keys.delete_one({"_id": stored["_id"], "expires": stored["expires"]})
        abort(409, description="Idempotency-Key %r is being used by another request right now; retry" % key)

    def finish(self, record_id, status, body, content_type):
        self.keys.update_one(
            {"_id": record_id, "state": "pending"},
            {"$set": {"state": "done", "status": status, "body": body, "content_type": content_type}},
        )

    def drop(self, record_id):
        self.keys.delete_one({"_id": record_id, "state": "pending"})

    def _sweep(self, now):
        if time.monotonic() - self._swept < SWEEP_INTERVAL:
            return
        self._swept = time.monotonic()
        self.keys.delete_many({"expires": {"$lt": now}})


def _owner():
    identity = current_identity()
    return identity.name or identity.token_id or identity.role


def _applies():
    """A POST to an Eve collection (`/tasks`, `/jobs`), with the header, by
    a role that may create there."""
    return (
        request.method == "POST"
        and (request.endpoint or "").endswith("|resource")
        and request.headers.get("Idempotency-Key") is not None
        and current_identity().role in ("admin", "user", ATTEMPT_ROLE)
    )


def before_request():
    if not _applies():
        return None
    key = request.headers["Idempotency-Key"]
    if not 0 < len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        abort(400, description="Idempotency-Key must be 1 to %d printable characters, such as a UUID" % MAX_KEY_LENGTH)
    fingerprint = hashlib.sha256(request.get_data(cache=True)).hexdigest()
    store = services().idempotency
    stored, record_id = store.claim(_owner(), key, fingerprint)
    if record_id is not None:
        g.banyan_idempotency = record_id
        return None
    if stored["fingerprint"] != fingerprint:
        abort(
            422,
            description="Idempotency-Key %r was already used for a different request body; "
            "use a new key for a new request" % key,
        )
    if stored["state"] != "done":
        abort(
            409,
            description=(
                "a request with Idempotency-Key %r is still being handled, or its server stopped while "
                "handling it; its tasks may exist: look (banyan ls, GET /tasks) before submitting again" % key
            ),
        )
    response = current_app.response_class(
        stored["body"], status=stored["status"], content_type=stored.get("content_type") or "application/json"
    )
    response.headers[HEADER] = "true"
    return response


def after_request(response):
    record_id = g.pop("banyan_idempotency", None)
    if record_id is None:
        return response
    store = services().idempotency
    if 200 <= response.status_code < 300:
        store.finish(record_id, response.status_code, response.get_data(as_text=True), response.content_type)
    elif response.status_code < 500:
        store.drop(record_id)  # refused, so nothing was created: the key may be used again
    # A 5xx (a bug) may have created tasks: the key stays pending and answers 409.
    return response


def teardown_request(error=None):
    record_id = g.pop("banyan_idempotency", None)
    if record_id is not None:  # no answer was built: nothing was acknowledged
        services().idempotency.drop(record_id)


def init_app(app, db):
    """After `auth.init_app` (the caller must be known first)."""
    services(app).idempotency = KeyStore(db, app.config["IDEMPOTENCY_TTL"])
    app.before_request(before_request)
    app.after_request(after_request)
    app.teardown_request(teardown_request)
