"""Single-document updates that stay atomic on FerretDB 1.x.

Every rule of the state machine is one conditional update
(`find_one_and_update({"_id": ..., "state": "available"}, ...)`): of two
racing writers, MongoDB lets exactly one match. FerretDB 1.x does not: it
reads the document, applies the update in its own process and writes the
whole document back by `_id`, with nothing between the read and the write
(FerretDB issue 3040). Two claims of one task both "win"; two `$inc` of one
counter lose one. Measured with the suite: 8 claimers took 2,299 claims of
2,000 tasks on FerretDB 1.24 on PostgreSQL.

What FerretDB does enforce atomically is a unique index. So on a store that
needs it, each update of one document runs while its writer holds a lock
document `{"key": "<collection>:<_id>"}` in `document_locks`, inserted under
a unique index on `key` (an insert either takes the lock or fails with a
duplicate key) and deleted afterwards. Writers in any server process then
take turns per document, and the store's read-modify-write behaves like
MongoDB's atomic update. A lock left by a process that died is broken once
its lease (`LEASE`, seconds) is over; each lock document has an `_id` of its
own, so breaking a stale lock can never delete a live one.

A claim takes the locks of all its candidates at once (`locked_documents`:
one insert, one read, one delete for the batch) and passes over those
another writer holds, as `SELECT ... FOR UPDATE SKIP LOCKED` would, so
concurrent claimers spread over the queue instead of queueing behind one
another on the same tasks. Updates of documents a thread holds that way take
no lock of their own.

On MongoDB (no `ferretdbVersion` in `buildInfo`, or FerretDB 2, which runs
updates inside PostgreSQL) the collections behave exactly as pymongo's: the
check is made once per client, on its first update.
"""

import contextlib
import threading
import time
from datetime import datetime, timedelta, timezone

from bson import ObjectId
from pymongo import MongoClient, ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError
from pymongo.results import UpdateResult

LOCKS = "document_locks"
#: Seconds a writer may hold a document's lock before another may break it.
LEASE = 30.0
#: Attempts at an update whose target changed between finding and locking it.
RETARGETS = 50


def takes_document_locks(collection):
    """Whether updates of `collection` take document locks (FerretDB 1.x)."""
    return isinstance(collection, LockingCollection) and collection._locking()


@contextlib.contextmanager
def locked_documents(collection, ids):
    """Hold the locks of those of `ids` (documents of `collection`) that no
    other writer holds, and yield the set of them; this thread's updates of
    them take no lock of their own until the block ends. On a store whose
    updates are atomic (or a collection that is not a LockingCollection),
    yield every id and take nothing."""
    if not takes_document_locks(collection):
        yield set(ids)
        return
    with collection._locked_many(ids) as held:
        yield held


def needs_document_locks(build_info):
    """True for stores whose updates are not atomic (FerretDB before 2.0)."""
    version = str(build_info.get("ferretdbVersion") or "")
    return bool(version) and version.lstrip("v").split(".")[0] in ("0", "1")


class LockingClient(MongoClient):
    """A MongoClient whose collections take document locks where the
    store needs them (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._banyan_locks = None
        self._banyan_locks_lock = threading.Lock()
        self._banyan_indexed = set()
        self._banyan_mine = threading.local()  # .keys: locks this thread holds (`locked_documents`)

    def __getitem__(self, name):
        return LockingDatabase(self, name)

    def get_database(self, *args, **kwargs):
        return _wrap(self, super().get_database(*args, **kwargs))

    def get_default_database(self, *args, **kwargs):
        return _wrap(self, super().get_default_database(*args, **kwargs))

    def uses_document_locks(self):
        with self._banyan_locks_lock:
            if self._banyan_locks is None:
                self._banyan_locks = needs_document_locks(self.admin.command("buildInfo"))
            return self._banyan_locks


def _wrap(client, db):
    return LockingDatabase(client, db.name, db.codec_options, db.read_preference, db.write_concern, db.read_concern)


class LockingDatabase(Database):
    def __getitem__(self, name):
        return LockingCollection(self, name)

    def get_collection(self, name, codec_options=None, read_preference=None, write_concern=None, read_concern=None):
        return LockingCollection(self, name, False, codec_options, read_preference, write_concern, read_concern)


class LockingCollection(Collection):
    """pymongo's Collection; on a store without atomic updates, each
    update of a document holds that document's lock."""

    def with_options(self, codec_options=None, read_preference=None, write_concern=None, read_concern=None):
        # (pymongo's makes a plain Collection; Eve writes through one)
        plain = super().with_options(codec_options, read_preference, write_concern, read_concern)
        return LockingCollection(
            self.database,
            self.name,
            False,
            plain.codec_options,
            plain.read_preference,
            plain.write_concern,
            plain.read_concern,
        )

    def _locking(self):
        return self.name != LOCKS and self.database.client.uses_document_locks()

    def _locks(self):
        client = self.database.client
        locks = Collection(self.database, LOCKS)
        if self.database.name not in client._banyan_indexed:
            locks.create_index("key", unique=True)
            client._banyan_indexed.add(self.database.name)
        return locks

    def _key(self, doc_id):
        return "%s:%s:%s" % (self.name, type(doc_id).__name__, doc_id)

    def _mine(self):
        """The keys of the locks this thread holds in this database through
        `locked_documents`."""
        local = self.database.client._banyan_mine
        if not hasattr(local, "keys"):
            local.keys = {}
        return local.keys.setdefault(self.database.name, set())

    @contextlib.contextmanager
    def _locked_many(self, ids):
        """`locked_documents` on a store that needs locks: a read of the
        locks held already (breaking those whose lease is over), one insert
        of the others, and a read of which were taken only if that insert
        met a lock taken meanwhile (FerretDB takes a batch with duplicate
        keys one document at a time: ten times as long)."""
        locks, mine = self._locks(), self._mine()
        keys = {self._key(doc_id): doc_id for doc_id in ids}
        now = datetime.now(timezone.utc)
        others = set()
        wanted = [key for key in keys if key not in mine]
        for held in locks.find({"key": {"$in": wanted}}, {"key": 1, "expires": 1}) if wanted else ():
            if held.get("expires") is not None and held["expires"].replace(tzinfo=timezone.utc) < now:
                locks.delete_one({"_id": held["_id"]})  # its writer died: break it
            else:
                others.add(held["key"])
        wanted = {ObjectId(): key for key in wanted if key not in others}
        taken = set(wanted)
        if wanted:
            expires = now + timedelta(seconds=LEASE)
            try:
                locks.insert_many(
                    [{"_id": _id, "key": key, "expires": expires} for _id, key in wanted.items()], ordered=False
                )
            except BulkWriteError:  # some were taken meanwhile
                taken = {d["_id"] for d in locks.find({"_id": {"$in": list(wanted)}}, {"_id": 1})}
        got = {wanted[_id] for _id in taken}
        mine.update(got)
        try:
            yield {doc_id for key, doc_id in keys.items() if key in mine}
        finally:
            mine.difference_update(got)
            if taken:
                locks.delete_many({"_id": {"$in": list(taken)}})

    @contextlib.contextmanager
    def _locked(self, doc_id):
        key = self._key(doc_id)
        if key in self._mine():  # held by this thread (`locked_documents`)
            yield
            return
        locks = self._locks()
        mine = ObjectId()
        pause = 0.0005
        while True:
            now = datetime.now(timezone.utc)
            try:
                locks.insert_one({"_id": mine, "key": key, "expires": now + timedelta(seconds=LEASE)})
                break
            except DuplicateKeyError:
                held = locks.find_one({"key": key})
                expires = held and held.get("expires")
                if expires is not None and expires.replace(tzinfo=timezone.utc) < now:
                    locks.delete_one({"_id": held["_id"]})  # its writer died: break it
                    continue
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        try:
            yield
        finally:
            locks.delete_one({"_id": mine})

    # -- which document an update is for ------------------------------------

    @staticmethod
    def _pinned(filter):
        """The `_id` a filter names as a plain value, else None."""
        value = (filter or {}).get("_id")
        return None if value is None or isinstance(value, dict) else value

    @staticmethod
    def _narrowed(filter, doc_id):
        """`filter`, for document `doc_id` only, which `filter` was found to
        match (top-level keys kept, which FerretDB hands to the database).
        Its condition on `_id` (an `$in`, say) is then the equality: an `_id`
        never changes, so the document still meets it, and FerretDB 1.x hands
        PostgreSQL an equality only at the top level (an `_id` inside `$and`
        scanned the collection for each document of an `update_many`)."""
        return dict(filter or {}, _id=doc_id)

    def _one(self, filter, sort, write):
        """Run `write(narrowed filter)` on the first document `filter`
        matches, holding its lock; look again if it stopped matching
        before the lock was taken. Returns (found, result)."""
        pinned = self._pinned(filter)
        for _ in range(RETARGETS):
            if pinned is not None:
                target = pinned
            else:
                found = self.find_one(filter, {"_id": 1}, sort=sort)
                if found is None:
                    return False, None
                target = found["_id"]
            with self._locked(target):
                found, result = write(self._narrowed(filter, target))
            if found or pinned is not None:
                return found, result
        return False, None

    # -- the updates ------------------------------------------------------------

    def find_one_and_update(
        self,
        filter,
        update,
        projection=None,
        sort=None,
        upsert=False,
        return_document=ReturnDocument.BEFORE,
        *args,
        **kwargs,
    ):
        if not self._locking():
            return super().find_one_and_update(
                filter, update, projection, sort, upsert, return_document, *args, **kwargs
            )

        def write(narrowed):
            doc = super(LockingCollection, self).find_one_and_update(
                narrowed, update, projection, None, upsert and pinned, return_document, *args, **kwargs
            )
            return doc is not None or (upsert and pinned), doc

        pinned = self._pinned(filter) is not None
        found, doc = self._one(filter, sort, write)
        if not found and upsert and not pinned:
            return super().find_one_and_update(
                filter, update, projection, sort, upsert, return_document, *args, **kwargs
            )
        return doc

    def update_one(self, filter, update, upsert=False, *args, **kwargs):
        if not self._locking():
            return super().update_one(filter, update, upsert, *args, **kwargs)
        pinned = self._pinned(filter) is not None

        def write(narrowed):
            result = super(LockingCollection, self).update_one(narrowed, update, upsert and pinned, *args, **kwargs)
            return result.matched_count > 0 or result.upserted_id is not None, result

        found, result = self._one(filter, kwargs.get("sort"), write)
        if result is None:
            if upsert:
                return super().update_one(filter, update, upsert, *args, **kwargs)
            return UpdateResult({"n": 0, "nModified": 0, "ok": 1.0}, True)
        return result

    def replace_one(self, filter, replacement, upsert=False, *args, **kwargs):
        if not self._locking():
            return super().replace_one(filter, replacement, upsert, *args, **kwargs)
        pinned = self._pinned(filter) is not None

        def write(narrowed):
            result = super(LockingCollection, self).replace_one(
                narrowed, replacement, upsert and pinned, *args, **kwargs
            )
            return result.matched_count > 0 or result.upserted_id is not None, result

        found, result = self._one(filter, None, write)
        if result is None:
            if upsert:
                return super().replace_one(filter, replacement, upsert, *args, **kwargs)
            return UpdateResult({"n": 0, "nModified": 0, "ok": 1.0}, True)
        return result

    def update_many(self, filter, update, upsert=False, *args, **kwargs):
        if not self._locking():
            return super().update_many(filter, update, upsert, *args, **kwargs)
        matched = modified = 0
        for doc in list(self.find(filter, {"_id": 1})):
            with self._locked(doc["_id"]):
                result = super().update_one(self._narrowed(filter, doc["_id"]), update, False, *args, **kwargs)
            matched += result.matched_count
            modified += result.modified_count
        if not matched and upsert:
            return super().update_many(filter, update, upsert, *args, **kwargs)
        return UpdateResult({"n": matched, "nModified": modified, "ok": 1.0}, True)
