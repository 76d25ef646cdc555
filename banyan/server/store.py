"""Store selection: the server's one interface to its store.

`connect()` is the only place in Banyan that knows which store is underneath:
a real MongoDB (pymongo) when a URI is given, else the embedded store
(`banyan.store`, an `EmbeddedClient`). `one_sync` and `sync_visible` let a
request's writes share one fdatasync on the embedded store and do nothing on
MongoDB. A write the embedded store cannot make durable raises
`StoreUnavailable` (and changes nothing); damaged files refuse to open with
`StoreCorrupt`.
"""

import contextlib
import os
from datetime import timezone

import pymongo.errors

from banyan.store.adapter import DEFAULT_COMPACT_BYTES, DEFAULT_DATABASE, EmbeddedClient, EmbeddedCollection
from banyan.store.errors import StoreCorrupt, StoreUnavailable

__all__ = [
    "connect",
    "one_sync",
    "sync_visible",
    "first",
    "sole_writer",
    "needs_views",
    "nul_path",
    "find_in",
    "NUL_REFUSED",
    "EmbeddedClient",
    "EmbeddedCollection",
    "StoreCorrupt",
    "StoreUnavailable",
    "DEFAULT_DATABASE",
]

#: Why a string holding a NUL character is refused (see `nul_path`).
NUL_REFUSED = "must not contain a NUL character (\\u0000)"


def connect(mongo_uri=None, data_dir=None):
    """Return a MongoClient-shaped client.

    A pymongo.MongoClient (document_locks.LockingClient) when mongo_uri is given,
    else an EmbeddedClient persisted under data_dir (default ~/.banyan;
    its journal is compacted past BANYAN_STORE_COMPACT_BYTES, default 64 MiB).
    """
    if mongo_uri:
        # pymongo's client, with updates made atomic where the store's are not
        from banyan.server.document_locks import LockingClient

        return LockingClient(mongo_uri, tz_aware=True)
    if data_dir is None:
        data_dir = os.path.join(os.path.expanduser("~"), ".banyan")
    compact_bytes = int(os.environ.get("BANYAN_STORE_COMPACT_BYTES") or DEFAULT_COMPACT_BYTES)
    return EmbeddedClient(data_dir, compact_bytes=compact_bytes)


#: What a store raises for a query it cannot run: MongoDB an OperationFailure,
#: the embedded store also the errors of Python's own comparisons and the
#: operators it lacks. A store that cannot be reached is not among them.
QUERY_ERRORS = (pymongo.errors.OperationFailure, TypeError, ValueError, NotImplementedError)


def aware(when):
    """A stored datetime as timezone-aware UTC: MongoDB's client is made
    `tz_aware`, the embedded store gives naive UTC ones. The state machine
    and the views compare stored times through this, never by hand."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=timezone.utc)


def _engine(client):
    return client._engine if isinstance(client, EmbeddedClient) else None  # pylint: disable=protected-access


def one_sync(client):
    """A context in which the embedded store's writes share one fdatasync,
    done when it exits (see `Engine.one_sync`). With MongoDB, whose write
    concern acknowledges each write, it does nothing."""
    engine = _engine(client)
    return engine.one_sync() if engine is not None else contextlib.nullcontext()


def sync_visible(client):
    """Make durable every write other threads have already made visible, so
    that an answer built from what was read reports nothing a crash could
    still undo (the writer's own sync would come a moment later; they share
    it). With MongoDB, whose write concern acknowledges each write, nothing."""
    engine = _engine(client)
    if engine is not None:
        engine.sync_written()


def first(client):
    """A context in which this thread's calls to the embedded store go
    ahead of other threads' waiting ones (see `Engine.first`): `banyan
    server` serves its users' requests so while workers' requests take
    turns. With MongoDB, which serves each connection on its own, nothing."""
    engine = _engine(client)
    return engine.first() if engine is not None else contextlib.nullcontext()


def needs_views(client):
    """True for an embedded store that has no aggregation view defined yet
    (a new one, or one from before views were kept from the first start):
    the server then defines `/stats`'s at start (`serve.define_stats_views`).
    False for MongoDB, which keeps none."""
    return _engine(client) is not None and not client.views_defined()


def sole_writer(client):
    """True when no other process can change what `client` stores: the
    embedded store's lock file keeps every other process out, so what this
    process's own writes announce (a task finished, a task ready) is every
    change there is. False for MongoDB, which several server processes share."""
    return _engine(client) is not None


def nul_path(value, path=""):
    """The path (`a.b.0`) of the first string in `value` (dict keys included)
    that holds a NUL character, or None. A NUL in a key is shown as `\\u0000`.

    One rule for every store: no string a client sends to be stored or
    matched may hold one. PostgreSQL, under FerretDB, cannot store it (its
    `jsonb` has no NUL: the write fails), MongoDB refuses it in field names,
    and an answer must not depend on the store. Refused with a 4xx naming
    the path; a task's output, which may hold any bytes, is kept as bytes
    instead (`claims.LogStore`)."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = ("%s.%s" % (path, key) if path else str(key)).replace("\x00", "\\u0000")
        if isinstance(key, str) and "\x00" in key:
            return where
        found = nul_path(item, where)
        if found is not None:
            return found
    return None


#: Up to this many values, `find_in` reads one query by equality each.
FIND_IN_ONE_BY_ONE = 8


def find_in(collection, key, values, filter=None, projection=None):
    """The documents of `collection` whose `key` is one of `values` (and
    that match `filter`), as a list. Up to FIND_IN_ONE_BY_ONE values are
    read one query by equality each, which every store answers from its
    index: FerretDB 1.24 hands PostgreSQL only equalities, so an `$in`
    reads the whole collection (280 ms a query at 1,000 tasks, against 2 ms
    an equality); more values are read in one `$in` query."""
    values = list(dict.fromkeys(values))
    filter = filter or {}
    if len(values) > FIND_IN_ONE_BY_ONE:
        return list(
            collection.find(
                {"$and": [{key: {"$in": values}}, filter]} if key in filter else dict(filter, **{key: {"$in": values}}),
                projection,
            )
        )
    found = []
    for value in values:
        one = {"$and": [{key: value}, filter]} if key in filter else dict(filter, **{key: value})
        found += collection.find(one, projection)
    return found
