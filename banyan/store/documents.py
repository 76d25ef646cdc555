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
