"""The mongomock adapter: pymongo-shaped client, database and collection
classes over mongomock, made fit for serving.

* Atomic and thread-safe: every call runs under the engine's lock, so
  single-document operations (find_one_and_update with a state
  precondition, ...) are atomic like in MongoDB.
* Durable: every write call is journaled by the engine (`engine.Engine`)
  before its lock is released, and rolled back if that fails.
* Fast: mongomock answers every query by scanning every document.  Here
  `_id` equality / `$in` are dict lookups, and equality on the leading fields
  of a declared index (including multikey array fields) reads candidates from
  a SortedList per index.  When the sort equals the remaining index fields,
  candidates come out already in order and the scan stops at the first match
  for find_one / find_one_and_update / limit.  Every candidate is still
  checked with mongomock's own filter, and results (including order of ties)
  are exactly those of a mongomock full scan.
"""

import collections.abc
import copy
import datetime
import functools
import heapq
import itertools
import logging
import re
import time

import bson
import mongomock
import pymongo
from bson import ObjectId
from mongomock import aggregate as mm_aggregate
from mongomock import codec_options as mm_codec_options
from mongomock import collection as mm_collection
from mongomock import command_cursor as mm_command_cursor
from mongomock import database as mm_database
from mongomock import filtering, helpers
from mongomock import read_preferences as mm_read_preferences
from mongomock import store as mm_store
from mongomock.filtering import filter_applies
from pymongo import ReturnDocument
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    DuplicateKeyError,
    InvalidOperation,
    OperationFailure,
    WriteError,
)
from pymongo.results import BulkWriteResult

from banyan.store.aggregation import _READ_ONLY_STAGES, fast_stage, inclusion_projection, stage_name
from banyan.store.aggregation import _unwind_stage as _unwind_rows
from banyan.store.documents import Documents, FieldChanges, decode, encode, raw_id
from banyan.store.engine import Engine
from banyan.store.errors import StoreUnavailable
from banyan.store.indexes import EMPTY_KEY, TOP, SecondaryIndex, asc_key, indexable_spec
from banyan.store.planning import eq_conditions, lower_bounds, matcher, mongomock_sort, norm_sort, store_key
from banyan.store.state import Mismatch
from banyan.store.views import GroupView, SortView, ViewSet, fields_read

logger = logging.getLogger(__name__)

#: The mongomock versions this adapter is tested with (it subclasses
#: mongomock's classes and calls a few of their internals); pyproject.toml
#: pins the same range.
TESTED_MONGOMOCK = ((4, 3), (4, 4))  # >= 4.3, < 4.4
DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024
DEFAULT_DATABASE = "banyan"
_MAX_RANGES = 256
#: Documents a long read examines per hold of the lock.
SCAN_SLICE = 50
#: Aggregations (views.py) a collection keeps up to date at most.
VIEWS = 24
#: Stages that act on each document alone: a pipeline's leading run of them
#: gives each document's rows independently of the others.
_PER_DOCUMENT_STAGES = {"$match", "$project", "$unwind", "$addFields", "$set", "$unset"}


def _sort_key(field, doc):
    """The sort key of `field` in `doc`, ordered like mongomock's
    `resolve_sort_key` (an index key: natively comparable for plain values),
    detached from the document: it is compared after the lock is released."""
    value = filtering.resolve_key(field, doc)
    if isinstance(value, (list, tuple)):  # sorted by the first element
        if not value:
            return EMPTY_KEY
        value = value[0]
    if isinstance(value, (dict, list, tuple)):
        value = copy.deepcopy(value)
    return asc_key(value)


# mongomock deep-copies a document for every read and update, and the undo
# copy of `touch` is one more. ObjectIds and datetimes are immutable, yet
# `copy.deepcopy` rebuilds each through `__reduce_ex__`: a task whose
# `pending_parents` lists 500 ids cost ~5 ms of copies per update (a
# 1 -> 500 -> 1 graph: O(n^2)). Copying them as the atoms they are halves
# the CPU per finished task there. Only speed depends on this private table.
_DEEPCOPY_ATOMS = getattr(copy, "_deepcopy_dispatch", None)
if _DEEPCOPY_ATOMS is not None:
    for _atom in (ObjectId, datetime.datetime):
        _DEEPCOPY_ATOMS.setdefault(_atom, lambda value, memo: value)


# ---------------------------------------------------------------------------
# Stores: mongomock's in-memory stores, with secondary indexes and journaling
# hooks on every change.
# ---------------------------------------------------------------------------


class _CollectionStore(mm_store.CollectionStore):
    """mongomock CollectionStore keeping secondary indexes in sync.

    Inserts, replacements and deletes arrive through __setitem__ /
    __delitem__; in-place updates by mongomock's _update are reported via
    touch() and re-indexed by flush_touched().
    """

    def __init__(self, name, engine, db_name):
        super().__init__(name)
        self._documents = Documents()
        self._engine = engine
        self.db_name = db_name
        self._seq_counter = itertools.count()
        self._key_seq = {}
        self._seq_key = {}
        self._sec = {}  # index name -> SecondaryIndex
        self._pending = []  # store keys touched in place, to write back and re-index
        self._undo = None  # store key of the document the update under way changes
        self.view_sets = {}  # per-document stages (encoded) -> ViewSet
        self.recording = None  # None, 'one' or 'multi' while in _update
        self.deferred = False  # while loading: index everything at the end

    # -- index maintenance -------------------------------------------------
    # A document's index entries are computed from its stored BSON, when it
    # is indexed and again when it is unindexed, so they are found again
    # exactly (nothing per document is kept besides the entries themselves).
    def _decoded(self, raw, key):
        """`raw` decoded, its `_id` the store key itself when that is an
        ObjectId (the index entries then share it instead of a copy each)."""
        doc = decode(raw)
        if type(key) is ObjectId:  # pylint: disable=unidiomatic-typecheck
            doc["_id"] = key
        return doc

    def _index_doc(self, key):
        doc = self._decoded(self._documents.raw(key), key)
        seq = self._key_seq[key]
        memo = {}
        for idx in self._sec.values():
            entries, flags = idx.doc_entries(doc, seq, memo)
            idx.add(entries, flags)
        if self.view_sets:
            self._change_views(lambda view_set: view_set.change(doc, 1, seq))

    def _unindex_doc(self, key, raw):
        """Remove the entries of `raw`, the BSON stored under `key` until now."""
        if raw is None or not (self._sec or self.view_sets):
            return
        doc = self._decoded(raw, key)
        seq = self._key_seq[key]
        memo = {}
        for idx in self._sec.values():
            entries, flags = idx.doc_entries(doc, seq, memo)
            idx.remove(entries, flags)
        self._change_views(lambda view_set: view_set.change(doc, -1, seq))

    def _reindex_doc(self, key, old, new):
        """The document under `key` changed from the BSON `old` to `new`:
        its entries move from those of one to those of the other, in the
        indexes that read a field the update changed (`FieldChanges`) and
        where they differ. Taking out and putting back the same entries
        cost a tenth of a finished task."""
        if not (self._sec or self.view_sets):
            return
        before, after = self._decoded(old, key), self._decoded(new, key)
        changes = FieldChanges(before, after)
        seq = self._key_seq[key]
        memo_before, memo_after = {}, {}
        for idx in self._sec.values():
            if not changes.any_of(idx.reads):
                continue
            old_entries, old_flags = idx.doc_entries(before, seq, memo_before)
            new_entries, new_flags = idx.doc_entries(after, seq, memo_after)
            if old_entries != new_entries or old_flags != new_flags:
                idx.remove(old_entries, old_flags)
                idx.add(new_entries, new_flags)
        if self.view_sets:
            self._change_views(lambda view_set: view_set.replace(changes, seq))

    def _change_views(self, change):
        """`change(view_set)` for each view set; one it answers False for
        (a row it cannot keep) is dropped: the pipeline then runs as usual."""
        for prefix, view_set in list(self.view_sets.items()):
            if not change(view_set):
                del self.view_sets[prefix]

    def flush_touched(self):
        """Write back the documents updates changed in place, re-indexed."""
        docs = self._documents
        while self._pending:
            pending, self._pending = self._pending, []
            for key in dict.fromkeys(pending):
                doc = docs.live.pop(key, None)
                old = docs.raw(key)
                if doc is None or old is None:  # written already, undone or deleted
                    continue
                new = encode(doc)
                if new == old:
                    continue
                docs.put_raw(key, new)
                if not self.deferred:
                    self._reindex_doc(key, old, new)

    def touch(self, doc):
        """`doc` (read from the store) is about to be changed in place by an update."""
        key = store_key(doc["_id"])
        self._pending.append(key)
        before = self._documents.raw(key)
        self._engine.note_touch(self, key, doc["_id"], before)
        self._engine.note_undo(self, key, before)
        self._documents.live[key] = doc
        self._undo = key

    def undo_touch(self):
        """Forget the change of the document an update failed on: mongomock
        applies operators one by one, and MongoDB changes a document all or
        not at all. Documents finished earlier in an update_many stay
        changed, as in MongoDB."""
        if self._undo is not None:
            self._documents.live.pop(self._undo, None)
        self._undo = None

    # -- mongomock store API -----------------------------------------------
    def restore(self, key, doc):
        """Put back `doc` (BSON, or None: no document) under `key`,
        journaling nothing: undoes a change whose journal record could not
        be written."""
        if doc is None:
            if key in self._documents:
                del self[key]
        else:
            self[key] = doc

    def __setitem__(self, key, val):
        old = self._documents.raw(key)
        self._engine.note_undo(self, key, old)
        if key not in self._key_seq:
            seq = next(self._seq_counter)
            self._key_seq[key] = seq
            self._seq_key[seq] = key
        if not self.deferred:
            self._unindex_doc(key, old)
        self._documents[key] = val
        if not self.deferred:
            self._index_doc(key)
        if not self._engine.replaying:
            self._engine.note_doc(self, key, val["_id"] if isinstance(val, dict) else raw_id(encode(val)), forced=True)

    def load_raw(self, raws):
        """Store the documents `raws` (BSON) read from a file while loading
        (indexes built at the end, nothing journaled, nothing to undo):
        what `__setitem__` does then, without its per-document calls,
        most of a start's time once the indexes are read rather than built."""
        documents = self._documents
        key_seq, seq_key, counter = self._key_seq, self._seq_key, self._seq_counter
        for raw in raws:
            key = store_key(raw_id(raw))
            if key not in key_seq:
                seq = next(counter)
                key_seq[key] = seq
                seq_key[seq] = key
            documents.put_raw(key, raw)

    def __delitem__(self, key):
        old = self._documents.raw(key)
        self._engine.note_undo(self, key, old)
        if not self.deferred:
            self._unindex_doc(key, old)
        del self._documents[key]
        seq = self._key_seq.pop(key, None)
        self._seq_key.pop(seq, None)
        if not self._engine.replaying:
            self._engine.note_doc(self, key, raw_id(old), forced=True)

    def create(self):
        super().create()
        self._engine.note({"o": "mk", "d": self.db_name, "c": self.name})

    def drop(self):
        super().drop()
        self._documents = Documents()
        self.view_sets.clear()
        self._key_seq.clear()
        self._seq_key.clear()
        self._sec.clear()
        self._pending = []
        self._engine.note({"o": "drop", "d": self.db_name, "c": self.name})

    def create_index(self, index_name, index_dict):
        unchanged = self.indexes.get(index_name) == index_dict
        super().create_index(index_name, index_dict)
        if unchanged and (index_name in self._sec or not indexable_spec(index_dict)):
            return
        self._engine.note({"o": "ix", "d": self.db_name, "c": self.name, "n": index_name, "s": index_dict})
        self._sec.pop(index_name, None)
        if not indexable_spec(index_dict):
            return
        if self.deferred:
            self._sec[index_name] = SecondaryIndex(index_dict["key"])
            return
        self.flush_touched()
        self._build_indexes({index_name: SecondaryIndex(index_dict["key"])})

    def _build_indexes(self, indexes):
        """Fill the new, empty `indexes` ({name: SecondaryIndex}) from every
        document, each decoded once, and add them to the collection's."""
        built = list(indexes.values())
        all_entries = [[] for _ in built]
        all_flags = [{} for _ in built]  # per index: id(flags) -> [flags, documents with them] (flags are shared)
        key_seq = self._key_seq
        for key, raw in self._documents.raw_items():
            doc = self._decoded(raw, key)
            seq = key_seq[key]
            memo = {}
            for idx, entries_of, flags_of in zip(built, all_entries, all_flags):
                entries, flags = idx.doc_entries(doc, seq, memo)
                entries_of.extend(entries)
                counted = flags_of.get(id(flags))
                if counted is None:
                    flags_of[id(flags)] = [flags, 1]
                else:
                    counted[1] += 1
        for idx, entries, flags_of in zip(built, all_entries, all_flags):
            for flags, times in flags_of.values():
                idx.add_flags(flags, times)
            idx.add(entries, (), bulk=True)
        self._sec.update(indexes)

    def finish_loading(self):
        """Index all documents at once after a bulk load (much faster than
        one SortedList insertion at a time); a collection whose state the
        snapshot held (`import_state`) is indexed already."""
        if not self.deferred:
            return
        self.deferred = False
        self._build_indexes({name: SecondaryIndex(idx.fields) for name, idx in self._sec.items()})

    # -- views defined before a start (banyan.store.views) ---------------------
    def define_view(self, prefix, view_key):
        """Make the view `view_key` over the per-document stages `prefix`
        (both encoded, as `EmbeddedCollection._from_view` keys them), not
        built yet: a start replaying its definition builds it while it
        loads (`finish_loading`)."""
        view_set = self.view_sets.get(prefix)
        if view_set is None:
            self.make_room_for_a_view_set()
            view_set = self.view_sets[prefix] = ViewSet(
                _LazyRows(self._engine.rows_factory, self.db_name, self.name, prefix), fields_read(prefix)
            )
        if view_key not in view_set.views:
            view_set.views[view_key] = _new_view(view_key)

    def make_room_for_a_view_set(self):
        """At most VIEWS view sets: the least recently used goes."""
        if len(self.view_sets) >= VIEWS:
            self.view_sets.pop(next(iter(self.view_sets)))

    def view_action(self, prefix, view_key):
        """The journal action that defines view `view_key` over `prefix`."""
        return {"o": "view", "d": self.db_name, "c": self.name, "p": prefix, "t": view_key}

    def unbuilt_views(self):
        """(prefix, view set, [view...]) of the views not built yet, by view set."""
        out = []
        for prefix, view_set in list(self.view_sets.items()):
            views = [view for view in list(view_set.views.values()) if not view_set.built(view)]
            if views:
                out.append((prefix, view_set, views))
        return out

    def build_views(self, prefix_key, view_set, views, when):
        """Add every document's rows to new `views` of one view set, in one
        pass, SCAN_SLICE documents per hold of the lock (writes meanwhile
        change a view for the documents it has seen; another build of the
        same view at the same time skips what this one added). False if
        the view set was dropped."""
        engine = self._engine
        with engine.lock:
            engine.views_building += 1
            engine.views_activity = time.monotonic()
        try:
            return self._build_views(prefix_key, view_set, views, when)
        finally:
            with engine.lock:
                engine.views_building -= 1
                engine.views_activity = time.monotonic()

    def _build_views(self, prefix_key, view_set, views, when):
        engine = self._engine

        def add(doc, seq):
            rows = None
            for view in views:
                if seq > view.seen:
                    if rows is None:
                        rows = view_set.rows_of(doc)
                    view.change(rows, 1, seq)
                    view.seen = seq

        with engine.op():
            key_seq = self._key_seq
            keys = [(k, key_seq[k]) for k in self._documents]  # in store (seq) order
        for begin in range(0, len(keys) + 1, SCAN_SLICE):
            if begin:
                engine.let_waiters_in()
            if engine.closing:
                return False
            with engine.op():
                if self.view_sets.get(prefix_key) is not view_set:
                    return False
                views = [view for view in views if not view_set.built(view)]  # (another build ended them)
                if not views:
                    return True
                documents = self._documents
                key_seq = self._key_seq
                try:
                    for k, seq in keys[begin : begin + SCAN_SLICE]:
                        if key_seq.get(k) == seq:  # (deleted since, or a new one: below)
                            add(documents[k], seq)
                    if begin + SCAN_SLICE < len(keys):
                        continue
                    seen = min(view.seen for view in views)
                    for seq in sorted(s for s in self._seq_key if s > seen):  # written since the keys were listed
                        add(documents[self._seq_key[seq]], seq)
                except Exception:  # pylint: disable=broad-except  # a row a view cannot keep: the pipeline runs as usual
                    self.view_sets.pop(prefix_key, None)
                    return False
                for view in views:
                    view.seen = float("inf")
                engine.views_built += len(views)
                logger.info(
                    "built %d view%s of %s.%s from every document (%d), %s",
                    len(views),
                    "s" * (len(views) != 1),
                    self.db_name,
                    self.name,
                    len(documents),
                    when,
                )
                return True
        return True

    def view_definitions(self):
        """The journal actions that define every view of the collection."""
        return [
            self.view_action(prefix, view_key)
            for prefix, view_set in self.view_sets.items()
            for view_key in view_set.views
        ]

    # -- the state a snapshot keeps (banyan.store.state) ---------------------
    def export_state(self):
        """The documents' sequence numbers (in store order), the indexes
        and the built views, for the snapshot, as copies later writes do
        not change (it is written outside the lock); None while an update
        is under way (the snapshot then holds none: it is computed at start)."""
        if self.deferred or self._pending or self._documents.live:
            return None
        key_seq = self._key_seq
        views = {}
        for prefix, view_set in self.view_sets.items():
            built = {name: view.frozen() for name, view in view_set.views.items() if view_set.built(view)}
            if built:
                views[prefix] = built
        return {
            "seqs": [key_seq[key] for key in self._documents],
            "indexes": {name: idx.frozen() for name, idx in self._sec.items()},
            "views": views,
        }

    def import_state(self, state, rows_factory):
        """Take the state a snapshot held for the documents just loaded
        (`state.load` checked it was computed from them): the journal's
        changes are then indexed one by one, and nothing is built at the
        end. Raises state.Mismatch, changing nothing, if it does not fit."""
        seqs = state.get("seqs")
        indexes = state.get("indexes")
        views = state.get("views")
        if not isinstance(seqs, list) or len(seqs) != len(self._documents):
            raise Mismatch("its sequence numbers are not one per document")
        if any(type(s) is not int for s in seqs) or any(a >= b for a, b in zip(seqs, seqs[1:])):  # pylint: disable=unidiomatic-typecheck
            raise Mismatch("its sequence numbers are not increasing integers")
        if not isinstance(indexes, dict) or not all(isinstance(idx, SecondaryIndex) for idx in indexes.values()):
            raise Mismatch("its indexes are not indexes")
        wanted = {name: idx.fields for name, idx in self._sec.items()}
        if {name: idx.fields for name, idx in indexes.items()} != wanted:
            raise Mismatch("its indexes are not the collection's (%s)" % (", ".join(sorted(wanted)) or "none"))
        if not isinstance(views, dict) or not all(
            isinstance(prefix, bytes)
            and isinstance(built, dict)
            and all(isinstance(v, (GroupView, SortView)) and v.seen == float("inf") for v in built.values())
            for prefix, built in views.items()
        ):
            raise Mismatch("its views are not built views")
        canon = {seq: seq for seq in seqs}
        try:
            for idx in indexes.values():
                idx.take_seqs(canon)
        except (KeyError, AttributeError) as err:
            raise Mismatch("its indexes name documents it does not hold (%s)" % err) from err
        keys = list(self._documents)
        self._key_seq = dict(zip(keys, seqs))
        self._seq_key = dict(zip(seqs, keys))
        self._seq_counter = itertools.count(seqs[-1] + 1 if seqs else 0)
        self._sec = dict(indexes)
        for prefix, built in views.items():  # beside the views defined before and not built (`define_view`)
            view_set = self.view_sets.get(prefix)
            if view_set is None:
                view_set = self.view_sets[prefix] = ViewSet(
                    _LazyRows(rows_factory, self.db_name, self.name, prefix), fields_read(prefix)
                )
            view_set.views.update(built)
        self.deferred = False

    def drop_index(self, index_name):
        super().drop_index(index_name)
        self._sec.pop(index_name, None)
        self._engine.note({"o": "dx", "d": self.db_name, "c": self.name, "n": index_name})

    # -- query planning ----------------------------------------------------
    def _ordered_by_seq(self, keys):
        seqs = sorted(self._key_seq[k] for k in keys)
        docs = self._documents
        seq_key = self._seq_key
        return [docs[seq_key[s]] for s in seqs]

    def plan(self, spec, sort):
        """Candidate documents for spec, or None for a full scan.

        Returns (iterable of stored docs, ordered): `ordered` means the
        candidates already come in the order mongomock's sort would give
        (or store order when there is no sort).  Candidates are a superset
        of the matches; the caller applies the full filter.
        """
        self.flush_touched()
        conds = eq_conditions(spec, {})
        if not conds:
            return self._range_plan(spec, sort)
        if "_id" in conds:
            keys = set()
            for v in conds["_id"]:
                if isinstance(v, dict):
                    return None
                try:
                    if v in self._documents:
                        keys.add(v)
                except TypeError:
                    return None
            return self._ordered_by_seq(keys), not sort
        sort_fields = norm_sort(sort)
        best = None
        for name, idx in self._sec.items():
            prefix = []
            nranges = 1
            for field, _ in idx.fields:
                vals = conds.get(field)
                if vals is None:
                    break
                n = nranges * max(1, len(vals))
                if n > _MAX_RANGES:
                    break
                prefix.append(field)
                nranges = n
            if not prefix:
                continue
            aligned = False
            if (
                sort_fields is not None
                and nranges == 1
                and all(isinstance(d, (int, float)) and d for _, d in sort_fields)
            ):
                j = len(prefix)
                fixed = {f for (f, _), st in zip(idx.fields[:j], idx.stats) if not st[0]}
                wanted = [(f, 1 if d > 0 else -1) for f, d in sort_fields if f not in fixed]
                aligned = wanted == idx.fields[j:] and not any(st[0] for st in idx.stats[j:])
            score = (len(prefix), aligned, -len(idx.fields))
            if best is None or score > best[0]:
                best = (score, name, idx, prefix, aligned)
        if best is None:
            return self._range_plan(spec, sort)
        _, _, idx, prefix, aligned = best
        per_field = [[k for v in conds[field] for k in idx.lookup_keys(pos, v)] for pos, field in enumerate(prefix)]
        ranges = list(itertools.product(*per_field))
        if aligned and len(ranges) == 1:
            return self._iter_range(idx, ranges[0]), True
        keys = set()
        seq_key = self._seq_key
        for lo in ranges:
            for e in idx.entries.irange(lo, lo + (TOP,)):
                keys.add(seq_key[e[-1]])
        return self._ordered_by_seq(keys), not sort

    def _range_plan(self, spec, sort):
        """Candidates from an index whose first field (ascending) has a
        lower bound in `spec` (`$gt` / `$gte`): the documents with a key at
        or above it, or None. (The last hour's attempts of `/stats`.)"""
        bounds = lower_bounds(spec, {})
        if not bounds:
            return None
        for idx in self._sec.values():
            field, direction = idx.fields[0]
            if direction != 1 or field not in bounds:
                continue
            lows = [asc_key(v) for v in bounds[field]]
            if len({k[1] for k in lows}) != 1:
                continue  # bounds of different types: nothing matches, left to the scan
            low = max(lows, key=lambda k: k[2])
            keys = set()
            seq_key = self._seq_key
            for e in idx.entries.irange((low,), None):
                keys.add(seq_key[e[-1]])
                if len(keys) > len(seq_key) // 2:
                    return None  # most documents: a scan in slices is better
            return self._ordered_by_seq(keys), not sort
        return None

    def _iter_range(self, idx, lo):
        docs = self._documents
        seq_key = self._seq_key
        for e in idx.entries.irange(lo, lo + (TOP,)):
            yield docs[seq_key[e[-1]]]


def _new_view(view_key):
    """A new, unbuilt view of the kind `view_key` (as `_from_view` encodes
    it) names: a `$sort` field, or the `$group` stage."""
    tail = bson.decode(view_key)["t"]
    if isinstance(tail, str):
        return SortView(tail, _sort_key)
    return GroupView(tail[0]["$group"])


class _LazyRows:
    """rows_of(doc) of a view set a snapshot held: the per-document stages
    of its pipeline (`prefix`, encoded), made into a function by the
    collection the first time a write or a read needs it."""

    def __init__(self, rows_factory, db_name, col_name, prefix):
        self.rows_factory = rows_factory
        self.where = (db_name, col_name, prefix)
        self.rows_of = None

    def __call__(self, doc):
        if self.rows_of is None:
            self.rows_of = self.rows_factory(*self.where)
        return self.rows_of(doc)


class _DatabaseStore(mm_store.DatabaseStore):
    def __init__(self, engine, db_name):
        super().__init__()
        self._engine = engine
        self._db_name = db_name

    def __getitem__(self, col_name):
        try:
            return self._collections[col_name]
        except KeyError:
            col = self._collections[col_name] = _CollectionStore(col_name, self._engine, self._db_name)
            col.deferred = self._engine.replaying
            return col

    def rename(self, name, new_name):
        raise NotImplementedError("rename is not supported by the embedded store")


class _ServerStore(mm_store.ServerStore):
    def __init__(self, engine):
        super().__init__()
        self._engine = engine

    def collection_stores(self):
        """Every collection's store, as a list (others may add to them)."""
        return [store for db in list(self._databases.values()) for store in list(db._collections.values())]  # pylint: disable=protected-access

    def __getitem__(self, db_name):
        try:
            return self._databases[db_name]
        except KeyError:
            db = self._databases[db_name] = _DatabaseStore(self._engine, db_name)
            return db


# ---------------------------------------------------------------------------
# pymongo-shaped classes
# ---------------------------------------------------------------------------


class _Cursor(mm_collection.Cursor):
    """mongomock Cursor that only materializes skip+limit documents."""

    def __init__(self, *args, **kwargs):
        self._cache_key = None
        self._window = self._window_key = None
        super().__init__(*args, **kwargs)

    def _compute_results(self, with_limit_and_skip=False):
        stop = None
        if with_limit_and_skip and self._limit:
            stop = self._skip + abs(self._limit)
        wanted = (self._factory, stop)
        full = (self._factory, None)
        if self._results is None or self._cache_key not in (wanted, full):
            results = self._factory(stop=stop)
            if self.collection.codec_options.tz_aware:
                for doc in results:
                    _make_aware(doc)
            self._results = results
            self._cache_key = wanted
            self._window_key = None
        results = self._results
        if with_limit_and_skip:
            # `__next__` asks for the window once per document: slicing it
            # anew each time made iterating n documents cost n squared.
            key = (self._skip, self._limit)
            if self._window_key != key:
                window = results[self._skip :]
                if self._limit:
                    window = window[: abs(self._limit)]
                self._window, self._window_key = window, key
            results = self._window
        return results

    def clone(self):
        cursor = _Cursor(self.collection, self._spec, self._sort, self._projection, self._skip, self._limit)
        cursor._factory = self._factory
        return cursor


def _make_aware(value):
    """mongomock's `make_datetime_timezone_aware_in_document`, in place: the
    documents a read answers are its own (decoded for it, or copied), so
    their datetimes are made aware where they are instead of every dict
    and list being built again (a read of a task with 500 parents did)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        if isinstance(item, datetime.datetime):
            value[key] = item.replace(tzinfo=helpers.utc)
        elif isinstance(item, (dict, list)):
            _make_aware(item)


def _locked(name):
    base = getattr(mm_collection.Collection, name)

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        with self._engine.op():
            return base(self, *args, **kwargs)

    return method


class EmbeddedCollection(mm_collection.Collection):
    """mongomock Collection: locked, journaled, index-accelerated."""

    @property
    def _engine(self):
        return self.database.client._engine  # pylint: disable=protected-access

    def __reduce__(self):  # pragma: no cover - defensive
        raise TypeError("EmbeddedCollection cannot be pickled")

    # -- reads ---------------------------------------------------------------
    def find(
        self,
        filter=None,
        projection=None,
        skip=0,
        limit=0,  # pylint: disable=redefined-builtin
        no_cursor_timeout=False,
        cursor_type=None,
        sort=None,
        allow_partial_results=False,
        oplog_replay=False,
        modifiers=None,
        batch_size=0,
        manipulate=True,
        collation=None,
        session=None,
        max_time_ms=None,
        allow_disk_use=False,
        **kwargs,
    ):
        spec = {} if filter is None else filter
        mm_collection.validate_is_mapping("filter", spec)
        for kwarg, value in kwargs.items():
            if value:
                raise OperationFailure("Unrecognized field '%s'" % kwarg)
        return (
            _Cursor(self, spec, sort, projection, skip, limit, collation=collation)
            .max_time_ms(max_time_ms)
            .allow_disk_use(allow_disk_use)
        )

    def find_one(self, filter=None, *args, **kwargs):  # pylint: disable=keyword-arg-before-vararg,redefined-builtin
        if filter is None:
            filter = {}
        if not isinstance(filter, collections.abc.Mapping):
            filter = {"_id": filter}
        for doc in self.find(filter, *args, **kwargs).limit(-1):
            return doc
        return None

    def _get_dataset(self, spec, sort, fields, as_class, stop=None):
        """Matching documents, sorted and projected. Index plans run under
        the lock; scans of many documents run in slices (`_scan`)."""
        with self._engine.op():
            store = self._store
            plan = store.plan(spec, sort)
            if store.is_empty:
                filter_applies(spec, {})  # validate the filter like mongomock
            match = matcher(spec)
            keys, ordered = self._scan_keys(plan, sort)
            sort_fields = [] if ordered else norm_sort(sort)
            if keys is None or sort_fields is None or any(k.startswith("$") for k, _ in sort_fields):
                return self._dataset_now(plan, sort, match, fields, as_class, stop)
        if stop is not None and stop <= 0:
            return []
        rows = []
        sort_keys = [[] for _ in sort_fields]  # per sort field, one key per row
        # With a sort and a limit, only the documents that make the cut are
        # copied (after the sort, each read again and checked again).
        copy_later = bool(sort_fields) and stop is not None

        def take(key, doc):
            # (the store's own key object: a new one per row, a million of
            # them in a scan, made each full garbage collection meanwhile,
            # which stops every thread, walk them all)
            rows.append(key if copy_later else self._answer(doc, fields, as_class))
            for (field, _), keys_of_field in zip(sort_fields, sort_keys):
                keys_of_field.append(_sort_key(field, doc))
            return not sort_fields and stop is not None and len(rows) >= stop

        self._scan(keys, match, take)
        if not sort_fields:
            return rows
        if copy_later and len(sort_fields) == 1 and stop * 4 < len(rows):
            # The first `stop` rows in order, picked rather than sorting all
            # (one sort of 100,000 keys holds every other thread up for its
            # whole length; the pick lets them run between its steps).
            pick = heapq.nlargest if sort_fields[0][1] < 0 else heapq.nsmallest
            first = pick(stop, range(len(rows)), key=sort_keys[0].__getitem__)  # as a stable sort orders them
            out = self._read_again(rows, first, match, fields, as_class, stop)
            if len(out) >= stop:
                return out
            picked = set(first)  # some changed or went meanwhile: those after them, in order
            rest = [i for i in self._sorted_rows(len(rows), sort_fields, sort_keys) if i not in picked]
            return out + self._read_again(rows, rest, match, fields, as_class, stop - len(out))
        order = self._sorted_rows(len(rows), sort_fields, sort_keys)
        if not copy_later:
            return [rows[i] for i in order]
        return self._read_again(rows, order, match, fields, as_class, stop)

    @staticmethod
    def _sorted_rows(n, sort_fields, sort_keys):
        order = list(range(n))
        for (_, direction), keys_of_field in reversed(list(zip(sort_fields, sort_keys))):
            # mongomock's sort: stable, key by key from the last
            order.sort(key=keys_of_field.__getitem__, reverse=direction < 0)
        return order

    def _read_again(self, keys, order, match, fields, as_class, stop):
        """The first `stop` documents of `keys` (store keys), taken in
        `order`, that still exist and match."""
        out = []
        with self._engine.op():
            documents = self._store._documents  # pylint: disable=protected-access
            for i in order:
                doc = documents.get(keys[i])
                if doc is not None and match(doc):
                    out.append(self._answer(doc, fields, as_class))
                    if len(out) >= stop:
                        break
        return out

    def _answer(self, doc, fields, as_class):
        """What a read answers of the stored `doc`: its projection, a copy.
        A whole document is answered as it is: the store decodes a fresh
        one for every read (`Documents`), and a second deep copy of it cost
        a tenth of a claim. One that an update under way changes in place
        (`live`) is copied, as mongomock copies every document."""
        if not fields and as_class is dict and not self._store._documents.live:  # pylint: disable=protected-access
            return doc
        return self._copy_only_fields(doc, fields, as_class)

    def _dataset_now(self, plan, sort, match, fields, as_class, stop):
        """`_get_dataset` in one hold of the lock (the caller holds it)."""
        store = self._store
        if plan is None:
            docs, ordered = list(store._documents.values()), not sort  # pylint: disable=protected-access
        else:
            docs, ordered = plan
        matched = (d for d in docs if match(d))
        if sort and not ordered:
            matched = mongomock_sort(list(matched), sort)
        out = []
        if stop is not None and stop <= 0:
            return out
        for doc in matched:
            out.append(self._answer(doc, fields, as_class))
            if stop is not None and len(out) >= stop:
                break
        return out

    def _scan_keys(self, plan, sort):
        """(store keys, in order?) a read should visit in slices, or
        (None, _) when it is cheap enough to run in one hold of the lock
        (an index plan with few candidates, or one read in index order)."""
        store = self._store
        if plan is None:
            return list(store._documents), not sort  # pylint: disable=protected-access
        docs, ordered = plan
        if isinstance(docs, list) and len(docs) > SCAN_SLICE:
            return [store_key(d["_id"]) for d in docs], ordered
        return None, ordered

    def _scan(self, keys, match, visit):
        """Call visit(key, doc) on each matching document of `keys`, holding the
        lock for SCAN_SLICE documents at a time so that writes and other
        reads go through between slices. Each document is seen whole, as
        one call left it; documents inserted after the scan began are not
        seen, deleted ones are skipped (MongoDB's reads yield likewise).
        visit returns True to stop."""
        for start in range(0, len(keys), SCAN_SLICE):
            if start:
                self._engine.let_waiters_in()
            with self._engine.op():
                documents = self._store._documents  # pylint: disable=protected-access  # (a drop replaces it)
                for key in keys[start : start + SCAN_SLICE]:
                    doc = documents.get(key)
                    if doc is not None and match(doc) and visit(key, doc):
                        return

    def _iter_documents(self, filter):  # pylint: disable=redefined-builtin
        store = self._store
        if store.is_empty:
            filter_applies(filter, {})
        recording = store.recording
        plan = store.plan(filter, None)
        if plan is None:  # decoded one at a time, as the scan reaches them
            documents = store._documents  # pylint: disable=protected-access
            docs = (doc for doc in map(documents.get, list(documents)) if doc is not None)
        else:
            docs = plan[0]
            if recording == "multi":
                docs = list(docs)
        return self._yield_matching(matcher(filter), docs, store, recording)

    @staticmethod
    def _yield_matching(match, docs, store, recording):
        for doc in docs:
            if match(doc):
                if recording:
                    store.touch(doc)
                yield doc

    def count_documents(self, filter, **kwargs):  # pylint: disable=redefined-builtin
        with self._engine.op():
            if filter == {} and not kwargs:
                return len(self._store._documents)  # pylint: disable=protected-access
            if kwargs or not isinstance(filter, collections.abc.Mapping):
                return super().count_documents(filter, **kwargs)
            spec = helpers.patch_datetime_awareness_in_document(filter)
            store = self._store
            plan = store.plan(spec, None)
            if store.is_empty:
                filter_applies(spec, {})
            match = matcher(spec)
            keys, _ = self._scan_keys(plan, None)
            if keys is None:
                return sum(1 for doc in (plan[0] if plan else ()) if match(doc))
        count = [0]

        def one(_key, _doc):
            count[0] += 1

        self._scan(keys, match, one)
        return count[0]

    def estimated_document_count(self, **kwargs):
        with self._engine.op():
            if not kwargs:
                return len(self._store._documents)  # pylint: disable=protected-access
            return super().estimated_document_count(**kwargs)

    def aggregate(self, pipeline, session=None, **unused_kwargs):
        """mongomock's pipeline over copies of the matching documents. A
        leading `$match` uses the indexes, a following inclusion `$project`
        copies only its fields, and the stages after it run outside the
        lock (they only see those copies).

        A pipeline of per-document stages ending in a `$group` with one
        `$sum`, or in a `$sort` with a `$limit`, whose `$match` no index
        serves (it would read every document), is answered from a view
        (`banyan.store.views`) the writes keep up to date, so asking it again
        (`/stats`) costs the size of its answer."""
        if session:
            raise NotImplementedError("the embedded store has no sessions")
        pipeline = list(pipeline)
        answer = self._from_view(pipeline)
        if answer is not None:
            return mm_command_cursor.CommandCursor(answer)
        spec, projection = {}, None
        if pipeline and stage_name(pipeline[0]) == "$match":
            spec = pipeline.pop(0)["$match"]
        if pipeline and inclusion_projection(pipeline[0]):
            projection = pipeline.pop(0)["$project"]
        docs = list(self.find(spec, projection))  # in slices when it scans
        return mm_command_cursor.CommandCursor(self._run_stages(pipeline, 0, len(pipeline), docs))

    def _run_stages(self, pipeline, start, stop, docs):
        for i in range(start, stop):
            stage = pipeline[i]
            fast = fast_stage(pipeline, i)
            result = fast(docs, next(iter(stage.values()))) if fast else None
            if result is None:
                result = list(mm_aggregate.process_pipeline(docs, self.database, [stage], None))
            docs = result
        return docs

    @staticmethod
    def _per_document_prefix(pipeline):
        """How many leading stages of `pipeline` act on each document alone
        (0: it does not start with `$match` and an inclusion `$project`)."""
        if len(pipeline) < 2 or stage_name(pipeline[0]) != "$match" or not inclusion_projection(pipeline[1]):
            return 0
        n = 2
        while n < len(pipeline) and stage_name(pipeline[n]) in _PER_DOCUMENT_STAGES:
            n += 1
        return n

    def _from_view(self, pipeline):
        """The answer of `pipeline` from a view, or None when none fits."""
        n = self._per_document_prefix(pipeline)
        if not n:
            return None
        tail = pipeline[n:]
        sort = SortView.fits(tail)
        if sort is None and not GroupView.fits(tail):
            return None
        if sort is not None and not all(stage_name(s) in _READ_ONLY_STAGES for s in tail[sort[4] :]):
            return None
        try:
            prefix_key = bson.encode({"p": pipeline[:n]})
            view_key = bson.encode({"t": tail[:1] if sort is None else sort[0]})
        except Exception:  # pylint: disable=broad-except  # not encodable: no view
            return None
        with self._engine.op():
            store = self._store
            view_set = store.view_sets.pop(prefix_key, None)
            if view_set is None:
                spec = helpers.patch_datetime_awareness_in_document(pipeline[0]["$match"])
                if store.plan(spec, None) is not None:
                    return None  # an index finds the documents: reading them costs less than a view
                store.make_room_for_a_view_set()
                view_set = ViewSet(self._rows_of(pipeline, n), fields_read(prefix_key))
            store.view_sets[prefix_key] = view_set  # (the most recently used last)
            view = view_set.views.get(view_key)
            if view is None:
                view = view_set.views[view_key] = _new_view(view_key)
                # journaled, so that a start after a crash builds it at once (`_build_defined_views`)
                self._engine.note_hint(store.view_action(prefix_key, view_key))
        if not view_set.built(view):
            if not store.build_views(prefix_key, view_set, [view], "at the first read asking for it"):
                return None
            self._engine.save_views()
        with self._engine.op():
            if store.view_sets.get(prefix_key) is not view_set or view_key not in view_set.views:
                return None  # dropped meanwhile: a row it could not keep
            if sort is None:
                return copy.deepcopy(view.answer())
            field, direction, skip, limit, after = sort
            rows = []
            documents = store._documents  # pylint: disable=protected-access
            for seq, i in view.window(skip, limit, direction < 0):
                rows.append(view_set.rows_of(documents[store._seq_key[seq]])[i])  # pylint: disable=protected-access
        return self._run_stages(tail, after, len(tail), rows)

    def _rows_of(self, pipeline, n):
        """rows_of(doc): the rows pipeline[:n] gives one document (a fresh
        one, decoded for the call: its values are taken, not copied)."""
        spec = helpers.patch_datetime_awareness_in_document(pipeline[0]["$match"])
        projection = dict(pipeline[1]["$project"])
        plain = all("." not in field for field in projection)
        fields = [field for field in projection if field != "_id"]
        match = matcher(spec)
        tz_aware = self.codec_options.tz_aware
        steps = []
        for i in range(2, n):
            name = stage_name(pipeline[i])
            value = pipeline[i][name]
            if name == "$match":
                steps.append(("match", matcher(helpers.patch_datetime_awareness_in_document(value))))
            elif name == "$unwind" and isinstance(value, str) and value.startswith("$") and "." not in value:
                steps.append(("unwind", value))
            else:
                steps.append(("stage", i))

        def rows_of(doc):
            if not match(doc):
                return ()
            if plain:
                row = {"_id": doc["_id"]} if "_id" in doc else {}
                for field in fields:
                    if field in doc:
                        row[field] = doc[field]
            else:
                row = self._copy_only_fields(doc, dict(projection), dict)  # (it adds `_id` to the projection)
            if tz_aware:
                row = helpers.make_datetime_timezone_aware_in_document(row)
            rows = [row]
            for kind, what in steps:
                if kind == "match":
                    rows = [r for r in rows if what(r)]
                elif kind == "unwind":
                    rows = _unwind_rows(rows, what)
                else:
                    rows = self._run_stages(pipeline, what, what + 1, rows)
            return rows

        return rows_of

    def list_indexes(self, session=None):
        with self._engine.op():
            return iter(list(super().list_indexes(session=session)))

    # -- writes --------------------------------------------------------------
    def _update(
        self,
        spec,
        document,
        upsert=False,
        manipulate=False,
        multi=False,
        check_keys=False,
        hint=None,
        session=None,
        collation=None,
        let=None,
        array_filters=None,
        **kwargs,
    ):
        with self._engine.op():
            store = self._store
            previous = store.recording
            store.recording = "multi" if multi else "one"
            try:
                return super()._update(
                    spec,
                    document,
                    upsert=upsert,
                    manipulate=manipulate,
                    multi=multi,
                    check_keys=check_keys,
                    hint=hint,
                    session=session,
                    collation=collation,
                    let=let,
                    array_filters=array_filters,
                    **kwargs,
                )
            except (TypeError, AttributeError) as err:
                # an operator on a value of the wrong type (`$inc` on a
                # string, `$push` to a non-array): MongoDB's TypeMismatch
                store.undo_touch()
                raise WriteError(str(err), code=14) from err
            except Exception:
                store.undo_touch()
                raise
            finally:
                store.recording = previous
                store._undo = None  # pylint: disable=protected-access
                store.flush_touched()

    def _find_and_modify(
        self,
        query,
        projection=None,
        update=None,
        upsert=False,
        sort=None,
        return_document=ReturnDocument.BEFORE,
        session=None,
        **kwargs,
    ):
        with self._engine.op():
            if session:
                mm_collection.raise_not_implemented("session", "Mongomock does not handle sessions yet")
            remove = kwargs.get("remove", False)
            if kwargs.get("new", False) and remove:
                raise OperationFailure("remove and returnNew can't co-exist")
            if not (remove or update):
                raise ValueError("Must either update or remove")
            if remove and update:
                raise ValueError("Can't do both update and remove")
            old = self.find_one(query, projection=projection, sort=sort)
            if old is None and not upsert:
                return None
            target = query
            if old is not None:
                if "_id" in old:
                    target = {"_id": old["_id"]}
                else:
                    target = {"_id": self.find_one(query, projection={"_id": 1}, sort=sort)["_id"]}
            if remove:
                self.delete_one(target)
            else:
                updated = self._update(target, update, upsert)
                if updated["upserted"] is not None:
                    target = {"_id": updated["upserted"]}
            if return_document is ReturnDocument.AFTER or kwargs.get("new"):
                return self.find_one(target, projection)
            return old

    def create_index(self, key_or_list, cache_for=300, session=None, **kwargs):
        with self._engine.op():
            try:
                return super().create_index(key_or_list, cache_for, session=session, **kwargs)
            except OperationFailure as err:
                if err.code is None and "already exists with different options" in str(err):
                    raise OperationFailure(str(err), code=85) from err
                raise

    def bulk_write(self, requests, ordered=True, bypass_document_validation=False, session=None, **unused_kwargs):
        """pymongo bulk_write, run as one atomic call with one journal record.

        (mongomock 4.3's own bulk_write breaks on pymongo >= 4.9 operations.)
        """
        with self._engine.op():
            result = {
                "writeErrors": [],
                "writeConcernErrors": [],
                "nInserted": 0,
                "nUpserted": 0,
                "nMatched": 0,
                "nModified": 0,
                "nRemoved": 0,
                "upserted": [],
            }
            for index, request in enumerate(requests):
                try:
                    self._bulk_one(index, request, result)
                except (DuplicateKeyError, OperationFailure) as err:
                    result["writeErrors"].append(
                        {"index": index, "code": getattr(err, "code", None) or 2, "errmsg": str(err), "op": request}
                    )
                    if ordered:
                        break
            if result["writeErrors"]:
                raise BulkWriteError(result)
            return BulkWriteResult(result, True)

    def _bulk_one(self, index, request, result):
        if isinstance(request, pymongo.InsertOne):
            self.insert_one(request._doc)  # pylint: disable=protected-access
            result["nInserted"] += 1
        elif isinstance(request, (pymongo.UpdateOne, pymongo.UpdateMany, pymongo.ReplaceOne)):
            flt, doc = request._filter, request._doc  # pylint: disable=protected-access
            upsert = bool(request._upsert)  # pylint: disable=protected-access
            if isinstance(request, pymongo.ReplaceOne):
                res = self.replace_one(flt, doc, upsert=upsert)
            elif isinstance(request, pymongo.UpdateOne):
                res = self.update_one(flt, doc, upsert=upsert)
            else:
                res = self.update_many(flt, doc, upsert=upsert)
            if res.upserted_id is not None:
                result["nUpserted"] += 1
                result["upserted"].append({"index": index, "_id": res.upserted_id})
            else:
                result["nMatched"] += res.matched_count
                result["nModified"] += res.modified_count
        elif isinstance(request, (pymongo.DeleteOne, pymongo.DeleteMany)):
            flt = request._filter  # pylint: disable=protected-access
            if isinstance(request, pymongo.DeleteOne):
                result["nRemoved"] += self.delete_one(flt).deleted_count
            else:
                result["nRemoved"] += self.delete_many(flt).deleted_count
        else:
            raise TypeError(f"{request!r} is not a valid request")

    def drop_indexes(self, session=None):
        with self._engine.op():
            if session:
                mm_collection.raise_not_implemented("session", "Mongomock does not handle sessions yet")
            for name in list(self._store.indexes):
                self._store.drop_index(name)

    def rename(self, new_name, session=None, **kwargs):
        raise NotImplementedError("rename is not supported by the embedded store")

    def with_options(self, codec_options=None, read_preference=None, write_concern=None, read_concern=None):
        base = super().with_options(
            codec_options=codec_options,
            read_preference=read_preference,
            write_concern=write_concern,
            read_concern=read_concern,
        )
        if base is self:
            return self
        return EmbeddedCollection(
            self.database,
            self.name,
            _db_store=self._db_store,
            write_concern=base.write_concern,
            read_concern=base.read_concern,
            read_preference=base.read_preference,
            codec_options=base.codec_options,
        )


for _name in (
    "insert_one",
    "insert_many",
    "update_one",
    "update_many",
    "replace_one",
    "delete_one",
    "delete_many",
    "distinct",
    "create_indexes",
    "drop_index",
    "drop",
    "index_information",
    "find_one_and_delete",
    "find_one_and_replace",
    "find_one_and_update",
):
    setattr(EmbeddedCollection, _name, _locked(_name))
del _name


class EmbeddedDatabase(mm_database.Database):
    """mongomock Database handing out EmbeddedCollections."""

    def get_collection(self, name, codec_options=None, read_preference=None, write_concern=None, read_concern=None):
        with self._client._engine.op():  # pylint: disable=protected-access
            if read_preference is not None:
                mm_read_preferences.ensure_read_preference_type("read_preference", read_preference)
            mm_codec_options.is_supported(codec_options)
            try:
                return self._collection_accesses[name].with_options(
                    codec_options=codec_options or self._codec_options,
                    read_preference=read_preference or self.read_preference,
                    read_concern=read_concern,
                    write_concern=write_concern,
                )
            except KeyError:
                self._ensure_valid_collection_name(name)
                collection = self._collection_accesses[name] = EmbeddedCollection(
                    self,
                    name=name,
                    read_concern=read_concern,
                    write_concern=write_concern,
                    read_preference=read_preference or self.read_preference,
                    codec_options=codec_options or self._codec_options,
                    _db_store=self._store,
                )
                return collection

    def drop_collection(self, name_or_collection, session=None):
        with self._client._engine.op():  # pylint: disable=protected-access
            return super().drop_collection(name_or_collection, session=session)

    def create_collection(self, name, **kwargs):
        with self._client._engine.op():  # pylint: disable=protected-access
            return super().create_collection(name, **kwargs)

    def list_collection_names(self, filter=None, session=None):  # pylint: disable=redefined-builtin
        with self._client._engine.op():  # pylint: disable=protected-access
            return super().list_collection_names(filter=filter, session=session)

    def rename_collection(self, name, new_name, dropTarget=False):
        raise NotImplementedError("rename is not supported by the embedded store")

    def with_options(self, codec_options=None, read_preference=None, write_concern=None, read_concern=None):
        """write_concern is accepted and ignored: every write is fsynced."""
        mm_codec_options.is_supported(codec_options)
        if (read_preference is None or read_preference == self._read_preference) and codec_options is None:
            return self
        return EmbeddedDatabase(
            self._client,
            self.name,
            self._store,
            read_preference=read_preference or self._read_preference,
            codec_options=codec_options or self._codec_options,
            read_concern=read_concern or self._read_concern,
        )


def check_mongomock(version=None):
    """Refuse to run on a mongomock this adapter was not tested with: its
    internals change between versions, and a silent difference would be a
    wrong answer rather than an error."""
    version = version or mongomock.__version__
    low, high = TESTED_MONGOMOCK
    tested = ">=%d.%d,<%d.%d" % (low + high)
    found = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if not low <= found < high:
        raise RuntimeError(
            "the embedded store is tested with mongomock %s, and mongomock %s is installed: "
            "install a tested version (pip install 'mongomock%s'), or use MongoDB with --mongo-uri"
            % (tested, version, tested)
        )


class EmbeddedClient(mongomock.MongoClient):
    """MongoClient-shaped embedded store persisted under data_dir.

    Opening loads the snapshot and replays the journal; only one process may
    open a data_dir at a time.  get_database(None) returns 'banyan'.
    """

    def __init__(self, data_dir, *, compact_bytes=DEFAULT_COMPACT_BYTES):
        check_mongomock()
        # Set before mongomock's __init__: its __getattr__ maps unknown
        # attributes to databases.
        self._engine = Engine(data_dir, compact_bytes)
        super().__init__(tz_aware=True, _store=_ServerStore(self._engine))
        self._engine.open(self._store, self._rows_factory)
        self.data_dir = self._engine.data_dir
        if any(store.unbuilt_views() for store in self._store.collection_stores()):
            self._engine.start(self._build_defined_views, "banyan-store-views")

    def __repr__(self):
        return f"EmbeddedClient({self._engine.data_dir!r})"

    def views_defined(self):
        """True when some collection has a view defined (built or not)."""
        return any(store.view_sets for store in self._store.collection_stores())

    def _build_defined_views(self):
        """Build the views defined before this start that its snapshot did
        not hold built (the server crashed before a snapshot saved them),
        in slices that let requests through: the first `/stats` then finds
        them built, or joins the build where it is."""
        built = 0
        try:
            for store in self._store.collection_stores():
                for prefix, view_set, views in store.unbuilt_views():
                    if store.build_views(prefix, view_set, views, "at start, in the background"):
                        built += len(views)
        except (InvalidOperation, StoreUnavailable):  # closed, or stopped: nothing to build for
            return
        except Exception:  # pylint: disable=broad-except  # a view is no data: `/stats` builds it if asked
            logger.warning("could not build the views defined before in %s", self._engine.data_dir, exc_info=True)
            return
        logger.info("built the %d views defined before this start", built)
        self._engine.save_views()

    def _rows_factory(self, db_name, col_name, prefix):
        """rows_of(doc) of the per-document stages `prefix` (a view set's
        key: the encoded stages) in a collection, for a view a snapshot held."""
        stages = bson.decode(prefix)["p"]
        collection = self.get_database(db_name).get_collection(col_name)
        return collection._rows_of(stages, len(stages))  # pylint: disable=protected-access

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def get_database(self, name=None, codec_options=None, read_preference=None, write_concern=None, read_concern=None):
        if name is None:
            name = DEFAULT_DATABASE
        with self._engine.op():
            db = self._database_accesses.get(name)
            if db is None:
                db = self._database_accesses[name] = EmbeddedDatabase(
                    self,
                    name,
                    read_preference=read_preference or self.read_preference,
                    codec_options=codec_options or self._codec_options,
                    _store=self._store[name],
                    read_concern=read_concern,
                )
            return db

    def get_default_database(self, default=None, **kwargs):
        return self.get_database(default or DEFAULT_DATABASE, **kwargs)

    def list_database_names(self):
        with self._engine.op():
            return super().list_database_names()

    def drop_database(self, name_or_db):
        with self._engine.op():
            return super().drop_database(name_or_db)

    def start_session(self, causal_consistency=True, default_transaction_options=None):
        raise ConfigurationError("the embedded store does not support sessions")

    def close(self):
        """Flush and close the journal; the client is unusable afterwards."""
        self._engine.close()
