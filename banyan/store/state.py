"""A collection's derived state as a snapshot keeps it: its documents'
sequence numbers, its index entries in index order and its built views.

Computing them again at start-up means decoding every document and keying
it for every index (most of a restart's time), and a view costs a pass over
every document the first time `/stats` asks for it. A snapshot therefore
ends each collection's documents with one `state` record (the journal
format: `banyan.store.journal`) holding them pickled.

The journal stays the truth: the record names the documents it was
computed from (how many, and a digest of the checksums of the records
holding them), and a start uses it only when the documents it has just read
match both; a state that does not match, cannot be read, or holds anything
but the store's own classes is dropped with a warning and computed again
from the documents. Nothing is ever lost by dropping it.
"""

import gc
import io
import operator
import pickle
import struct
import zlib

from bson.objectid import ObjectId

from banyan.store.indexes import _Bson, _Rev

#: Bump when what is pickled changes (index keys, view fields): a state of
#: another version is computed again.
VERSION = 5

_CRC = struct.Struct("<I")

#: The only globals a state may name: the store's classes and the value
#: types index keys and view rows hold.
_ALLOWED = {
    ("banyan.store.indexes", "SecondaryIndex"),
    ("banyan.store.indexes", "_Bson"),
    ("banyan.store.indexes", "_Rev"),
    ("banyan.store.indexes", "_slice"),
    ("banyan.store.views", "GroupView"),
    ("banyan.store.views", "SortView"),
    ("banyan.store.adapter", "_sort_key"),
    ("bson.objectid", "ObjectId"),
    ("bson.int64", "Int64"),
    ("bson.binary", "Binary"),
    ("bson.decimal128", "Decimal128"),
    ("bson.timestamp", "Timestamp"),
    ("bson.regex", "Regex"),
    ("bson.code", "Code"),
    ("bson.min_key", "MinKey"),
    ("bson.max_key", "MaxKey"),
    ("bson.dbref", "DBRef"),
    ("array", "_array_reconstructor"),
    ("array", "array"),
    ("datetime", "datetime"),
    ("datetime", "timezone"),
    ("datetime", "timedelta"),
    ("fractions", "Fraction"),
    ("uuid", "UUID"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


class Mismatch(Exception):
    """A state that may not be used: it is computed again."""


def chain(digest, frame_crc):
    """The digest of a collection's document records, with one more record
    (its CRC32 as the record's header holds it)."""
    return zlib.crc32(_CRC.pack(frame_crc), digest)


def _by_value(cls, value_of):
    return lambda obj: (cls, (value_of(obj),))


#: How the objects of which a state holds one per document are written:
#: as their class and value. The default (their `__reduce_ex__`, in Python,
#: through copyreg) took most of a compaction's time.
_REDUCERS = {
    ObjectId: _by_value(ObjectId, operator.attrgetter("binary")),
    _Rev: _by_value(_Rev, operator.attrgetter("v")),
    _Bson: _by_value(_Bson, operator.attrgetter("v")),
}


def dump(state):
    """The bytes of a state (a dict of the collection's, `_CollectionStore.export_state`),
    as a memoryview (a copy of hundreds of megabytes holds every thread up)."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _REDUCERS
    collecting = gc.isenabled()
    gc.disable()  # nothing it makes is garbage, and each pass of the collector walks the whole store
    try:
        pickler.dump(state)
    finally:
        if collecting:
            gc.enable()
    return out.getbuffer()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise Mismatch("the state names %s.%s, which is not the store's" % (module, name))
        return super().find_class(module, name)


def load(action, documents, digest):
    """The state a `state` record (`action`) holds, if it was computed from
    the `documents` documents whose records give `digest`; else raise
    Mismatch saying why."""
    if action.get("v") != VERSION:
        raise Mismatch("it is of version %r, this Banyan's is %d" % (action.get("v"), VERSION))
    if action.get("n") != documents or action.get("digest") != digest:
        raise Mismatch(
            "it was computed from %r documents of digest %r, and the snapshot holds %d of digest %d"
            % (action.get("n"), action.get("digest"), documents, digest)
        )
    blob = action.get("state")
    if not isinstance(blob, bytes):
        raise Mismatch("it holds no state")
    try:
        state = _Unpickler(io.BytesIO(blob)).load()
    except Mismatch:
        raise
    except Exception as err:  # pylint: disable=broad-except  # anything unreadable is a mismatch
        raise Mismatch("it cannot be read (%s: %s)" % (type(err).__name__, err)) from err
    if not isinstance(state, dict):
        raise Mismatch("it is not a state")
    return state
