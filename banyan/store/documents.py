"""A collection's documents, kept as encoded BSON and decoded on demand.

A task held as Python objects (a dict of strings, datetimes, lists, nested
dicts) takes three to four times its BSON size in memory; as one `bytes`
object it takes its size. Every read gets a fresh decoded dict, so no caller
can change a stored document by accident. The one caller that changes
documents in place is an update (mongomock applies operators to the
document it is given): `live` holds those documents, and what the store
reads meanwhile, until the update writes them back (`put_raw`).
"""

import bson
from bson.codec_options import CodecOptions
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

#: As mongomock keeps documents: plain dicts, naive datetimes in UTC.
CODEC = CodecOptions(document_class=dict, tz_aware=False)

_get = dict.get
_set = dict.__setitem__
_items = dict.items


def encode(doc):
    """The BSON of a document (a dict, or a RawBSONDocument as read from a file)."""
    if isinstance(doc, RawBSONDocument):
        return doc.raw
    if isinstance(doc, bytes):
        return doc
    return bson.encode(doc)


def raw_id(raw):
    """The `_id` of a document in BSON, without decoding the rest when it
    is an ObjectId in first place (as the store writes them); decoding a
    whole task only for its id made most of a restart's time and memory."""
    if raw[4:9] == b"\x07_id\x00":
        return ObjectId(raw[9:21])
    return decode(raw)["_id"]


def decode(raw):
    return bson.decode(raw, codec_options=CODEC)


_MISSING = object()


def same_value(a, b):
    """`a` and `b` are the same BSON value, types and key order included:
    `1`, `True` and `1.0` are equal in Python, yet they are different
    index keys and give different rows."""
    if type(a) is not type(b):  # pylint: disable=unidiomatic-typecheck
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


class FieldChanges:
    """Which top-level fields an update changed, from the document
    `before` and `after` it (decoded). Whatever a document gives an index
    or a view is a function of the top-level fields it reads (`a.b` reads
    `a`), so one that reads none of the changed fields keeps its entries
    and rows: an update changes a few of a task's fields, and computing the
    entries of all its eleven indexes before and after each update made
    most of the fifth of the server's CPU per task spent re-indexing. Each
    field is compared once, when first asked about, so a long list no one
    reads is never compared."""

    __slots__ = ("before", "after", "_changed")

    def __init__(self, before, after):
        self.before = before
        self.after = after
        self._changed = {}  # field -> whether it changed

    def any_of(self, fields):
        """Whether the update changed any of the top-level `fields`."""
        known = self._changed
        for field in fields:
            changed = known.get(field)
            if changed is None:
                changed = known[field] = not same_value(
                    self.before.get(field, _MISSING), self.after.get(field, _MISSING)
                )
            if changed:
                return True
        return False


class Documents(dict):
    """store key -> BSON bytes, read as dicts (mongomock's `_documents`).

    Keys, `in`, `len` and order are a dict's; `[key]`, `get`, `values` and
    `items` decode. `raw(key)` is the stored form, for the journal."""

    __slots__ = ("live",)

    def __init__(self):
        super().__init__()
        self.live = {}  # store key -> the dict an update under way changes in place

    def __setitem__(self, key, doc):
        self.live.pop(key, None)
        _set(self, key, encode(doc))

    def __delitem__(self, key):
        self.live.pop(key, None)
        super().__delitem__(key)

    def __getitem__(self, key):
        doc = self.live.get(key)
        if doc is not None:
            return doc
        return decode(super().__getitem__(key))

    def get(self, key, default=None):
        doc = self.live.get(key)
        if doc is not None:
            return doc
        raw = _get(self, key)
        return default if raw is None else decode(raw)

    def values(self):
        live = self.live
        for key, raw in _items(self):
            doc = live.get(key)
            yield doc if doc is not None else decode(raw)

    def items(self):
        live = self.live
        for key, raw in _items(self):
            doc = live.get(key)
            yield key, (doc if doc is not None else decode(raw))

    def clear(self):
        self.live.clear()
        super().clear()

    def raw(self, key):
        """The BSON of the document under `key` as the store holds it
        (without an update under way), or None."""
        return _get(self, key)

    def raw_items(self):
        return _items(self)

    def raw_values(self):
        return dict.values(self)

    def put_raw(self, key, raw):
        """Store `raw` (BSON bytes) under `key`: an update writing back."""
        _set(self, key, raw)

    def decoded(self, key):
        """The stored document under `key`, decoded (never the live one)."""
        return decode(_get(self, key))
