"""Store selection and the embedded store.

`connect()` is the only place in Banyan that knows which store is underneath:
a real MongoDB (pymongo) when a URI is given, else an `EmbeddedClient`.

The embedded store is mongomock running inside the server process, made fit
for serving:

* Atomic and thread-safe: every operation runs under one per-client RLock,
  so single-document operations (find_one_and_update with a state
  precondition, ...) are atomic like in MongoDB.
* Durable: every write operation appends one record (after-images of changed
  documents, ids of deleted ones, index changes) to an append-only journal
  and fdatasyncs it before the call returns.  Group commit: the fsync runs
  outside the lock, so concurrent writers share one fsync.  On open the
  snapshot is loaded, the journal replayed (a torn last record is dropped),
  and a fresh snapshot written atomically; the journal is compacted the same
  way when it grows past `compact_bytes`.  Journal actions are idempotent
  (after-images, deletes by id), so replaying a journal over a snapshot that
  already contains it is harmless.
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
import contextlib
import copy
import datetime
import functools
import itertools
import logging
import operator
import os
import threading

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

import bson
import mongomock
import pymongo
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from mongomock import aggregate as mm_aggregate
from mongomock import codec_options as mm_codec_options
from mongomock import collection as mm_collection
from mongomock import command_cursor as mm_command_cursor
from mongomock import database as mm_database
from mongomock import filtering
from mongomock import helpers
from mongomock import read_preferences as mm_read_preferences
from mongomock import store as mm_store
from mongomock.filtering import NOTHING, filter_applies, iter_key_candidates
from pymongo import ReturnDocument
from pymongo.errors import (BulkWriteError, ConfigurationError, DuplicateKeyError,
                            InvalidOperation, OperationFailure, WriteError)
from pymongo.results import BulkWriteResult
from sortedcontainers import SortedList

from banyan.store import journal
from banyan.store.errors import StoreCorrupt, StoreUnavailable

logger = logging.getLogger(__name__)

DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024
DEFAULT_DATABASE = 'banyan'

_SNAPSHOT = journal.SNAPSHOT
_JOURNAL = journal.JOURNAL
_SNAPSHOT_CHUNK = 1000
_MAX_RANGES = 256


def connect(mongo_uri=None, data_dir=None):
    """Return a MongoClient-shaped client.

    pymongo.MongoClient(mongo_uri, tz_aware=True) when mongo_uri is given,
    else an EmbeddedClient persisted under data_dir (default ~/.banyan).
    """
    if mongo_uri:
        return pymongo.MongoClient(mongo_uri, tz_aware=True)
    if data_dir is None:
        data_dir = os.path.join(os.path.expanduser('~'), '.banyan')
    compact_bytes = int(os.environ.get('BANYAN_STORE_COMPACT_BYTES') or DEFAULT_COMPACT_BYTES)
    return EmbeddedClient(data_dir, compact_bytes=compact_bytes)


def _inclusion_projection(stage):
    """True for `{"$project": {field: 1, ...}}` naming plain fields only,
    which a find projection gives exactly."""
    if _stage_name(stage) != '$project':
        return False
    spec = stage['$project']
    return (isinstance(spec, dict) and bool(spec)
            and all(isinstance(k, str) and not k.startswith('$') and v in (1, True)
                    for k, v in spec.items()))


def _hashable(value):
    """A hashable stand-in for a `$group` key, equal for values MongoDB
    groups together (1 and 1.0 alike, True apart from 1); None for values
    it cannot stand in for."""
    if isinstance(value, bool):
        return ('bool', value)
    if isinstance(value, (int, float)):
        return ('number', 'NaN' if value != value else value)  # MongoDB groups NaNs together
    if value is None or isinstance(value, (str, ObjectId, datetime.datetime)):
        return ('value', value)
    if isinstance(value, dict):
        items = tuple((k, _hashable(v)) for k, v in value.items())
        return None if any(v is None for _, v in items) else ('object', items)
    if isinstance(value, list):
        items = tuple(_hashable(v) for v in value)
        return None if any(v is None for v in items) else ('array', items)
    return None


def _group_stage(docs, options):
    """`$group` by hashing each key once. mongomock sorts every document by
    its key with BSON comparisons first, which made most of a `/stats`
    request's time. None (use mongomock's) for keys this cannot hash."""
    if not isinstance(options, dict) or not options.get('_id'):
        return None
    groups = {}
    for doc in docs:
        try:
            key = mm_aggregate._parse_expression(options['_id'], doc, ignore_missing_keys=True)  # pylint: disable=protected-access
        except KeyError:
            key = None
        hashed = _hashable(key)
        if hashed is None:
            return None
        groups.setdefault(hashed, (key, []))[1].append(doc)
    out = []
    for key, members in groups.values():
        row = mm_aggregate._accumulate_group(options, members)  # pylint: disable=protected-access
        row['_id'] = key
        out.append(row)
    return out


def _sort_stage(docs, options):
    """`$sort` on one field whose values are all plain numbers, compared as
    numbers instead of through BSON comparisons. None (use mongomock's)
    otherwise."""
    if not isinstance(options, dict) or len(options) != 1:
        return None
    (field, direction), = options.items()
    if not isinstance(field, str) or '.' in field or field.startswith('$'):
        return None
    keys = []
    for doc in docs:
        value = doc.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return None
        keys.append(value)
    order = sorted(range(len(docs)), key=keys.__getitem__, reverse=direction < 0)
    return [docs[i] for i in order]


def _unwind_stage(docs, options):
    """`$unwind` of a top-level field given as a plain `"$field"`, with
    shallow copies (mongomock deep-copies the whole document once per
    element). The documents are the pipeline's own copies, and `aggregate`
    takes this path only when no later stage changes one in place. None
    (use mongomock's) otherwise."""
    if not isinstance(options, str) or not options.startswith('$') or '.' in options:
        return None
    field = options[1:]
    out = []
    for doc in docs:
        values = doc.get(field)
        if values is None:
            continue
        for value in values if isinstance(values, list) else [values]:
            row = dict(doc)
            row[field] = value
            out.append(row)
    return out


#: Stages the embedded store runs itself when it can (see their docstrings).
_FAST_STAGES = {'$group': _group_stage, '$sort': _sort_stage, '$unwind': _unwind_stage}
#: Stages that build new documents and never change their input in place:
#: after `$unwind`'s shallow copies, only these may follow.
_READ_ONLY_STAGES = {'$match', '$project', '$group', '$sort', '$skip', '$limit', '$count'}


def _stage_name(stage):
    return next(iter(stage), None) if isinstance(stage, dict) and len(stage) == 1 else None


def _fast_stage(pipeline, i):
    """The embedded store's own runner for stage `i`, or None."""
    name = _stage_name(pipeline[i])
    if name == '$unwind' and not all(_stage_name(s) in _READ_ONLY_STAGES for s in pipeline[i + 1:]):
        return None
    return _FAST_STAGES.get(name)


def one_sync(client):
    """A context in which the embedded store's writes share one fdatasync,
    done when it exits (see `_Engine.one_sync`). With MongoDB, whose write
    concern acknowledges each write, it does nothing."""
    engine = getattr(client, '_engine', None) if isinstance(client, EmbeddedClient) else None
    return engine.one_sync() if engine is not None else contextlib.nullcontext()


def sync_visible(client):
    """Make durable every write other threads have already made visible, so
    that an answer built from what was read reports nothing a crash could
    still undo (the writer's own sync would come a moment later; they share
    it). With MongoDB, whose write concern acknowledges each write, nothing."""
    engine = getattr(client, '_engine', None) if isinstance(client, EmbeddedClient) else None
    if engine is not None:
        engine._sync(engine.written_seq)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Index keys: a type-ranked, natively comparable form of BSON values.
# ---------------------------------------------------------------------------

class _Top:
    """Greater than every index key component; closes prefix ranges."""

    __slots__ = ()

    def __lt__(self, other):
        return False

    def __le__(self, other):
        return self is other

    def __gt__(self, other):
        return other is not self

    def __ge__(self, other):
        return True

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__


_TOP = _Top()


def _bson_cmp(op, a, b):
    try:
        return filtering.bson_compare(op, a, b)
    except (TypeError, NotImplementedError):
        return op((type(a).__name__, repr(a)), (type(b).__name__, repr(b)))


class _Bson:
    """Wraps values without a native order (dicts, lists, binary...)."""

    __slots__ = ('v',)

    def __init__(self, v):
        self.v = v

    def _cmp(self, op, other):
        if isinstance(other, _Bson):
            return _bson_cmp(op, self.v, other.v)
        if isinstance(other, _Top):
            return NotImplemented
        return _bson_cmp(op, self.v, other)

    def __lt__(self, other):
        return self._cmp(operator.lt, other)

    def __le__(self, other):
        return self._cmp(operator.le, other)

    def __gt__(self, other):
        return self._cmp(operator.gt, other)

    def __ge__(self, other):
        return self._cmp(operator.ge, other)

    def __eq__(self, other):
        return self._cmp(operator.eq, other)

    __hash__ = None


class _Rev:
    """Reverses the order of a value, for descending index fields."""

    __slots__ = ('v',)

    def __init__(self, v):
        self.v = v

    def __lt__(self, other):
        return other.v < self.v if isinstance(other, _Rev) else NotImplemented

    def __le__(self, other):
        return other.v <= self.v if isinstance(other, _Rev) else NotImplemented

    def __gt__(self, other):
        return other.v > self.v if isinstance(other, _Rev) else NotImplemented

    def __ge__(self, other):
        return other.v >= self.v if isinstance(other, _Rev) else NotImplemented

    def __eq__(self, other):
        return isinstance(other, _Rev) and self.v == other.v

    __hash__ = None


def _rank(v):
    try:
        return filtering._get_compare_type(v)  # pylint: disable=protected-access
    except NotImplementedError:
        return 99


def _asc_key(v):
    """(1, bson type rank, value) ordered like mongomock's resolve_sort_key.

    Python-equal values of the same rank get equal keys, which is what
    mongomock's equality matching uses.
    """
    t = type(v)
    if t is str:
        return (1, 15, v)
    if t is bool:
        return (1, 40, v)
    if t is ObjectId:
        return (1, 35, v)
    if v is None or v is NOTHING:
        return (1, 5, 0)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v != v:  # NaN: keep the SortedList's order total
            return (1, 9, 0)
        return (1, 10, v)
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = (v - v.utcoffset()).replace(tzinfo=None)
        return (1, 45, v)
    return (1, _rank(v), _Bson(v))


_EMPTY = (0, 0, 0)  # an empty array: sorts first, equals no query value


def _component(key, desc):
    if not desc:
        return key
    v = key[2]
    if type(v) in (int, float, bool):
        v = -v
    else:
        v = _Rev(v)
    return (-key[0], -key[1], v)


def _field_elements(field, doc):
    """Values of `field` that mongomock equality can match, and whether the
    field is multikey (array / several candidates) for this document."""
    cands = iter_key_candidates(field, doc)
    if len(cands) == 1 and not isinstance(cands[0], (list, tuple)):
        return cands, False
    elems = []
    for c in cands:
        if isinstance(c, (list, tuple)):
            elems.extend(c)
        else:
            elems.append(c)
    return elems, True


def _is_num01(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and (v == 0 or v == 1))


class _SecondaryIndex:
    """Entries `(component per field..., seq)` in index order.

    stats[i] = [docs multikey on field i, docs with a bool in field i,
    docs with a number equal to 0 or 1 in field i]; they decide whether
    the index can serve a sort and which bool/number keys an equality
    lookup must also visit (Python, hence mongomock, has True == 1).
    """

    def __init__(self, fields):
        self.fields = [(f, int(d)) for f, d in fields]
        self._plan = [(f, d < 0, '.' in f) for f, d in self.fields]
        self.entries = SortedList()
        self.stats = [[0, 0, 0] for _ in self.fields]

    def doc_entries(self, doc, seq):
        per_field = []
        flags = []
        for field, desc, dotted in self._plan:
            if not dotted:
                v = doc.get(field, NOTHING)
                if not isinstance(v, (list, tuple)):  # fast path: a plain scalar
                    per_field.append((_component(_asc_key(v), desc),))
                    flags.append((False, type(v) is bool, _is_num01(v)))
                    continue
            elems, multi = _field_elements(field, doc)
            keys = []
            has_bool = has_num = False
            for e in elems:
                if type(e) is bool:
                    has_bool = True
                elif _is_num01(e):
                    has_num = True
                k = _component(_asc_key(e), desc)
                if k not in keys:
                    keys.append(k)
            if not keys:
                keys.append(_component(_EMPTY, desc))
                multi = True
            per_field.append(keys)
            flags.append((multi, has_bool, has_num))
        entries = [combo + (seq,) for combo in itertools.product(*per_field)]
        return entries, flags

    def add(self, entries, flags, bulk=False):
        if bulk:
            self.entries.update(entries)
        else:
            for e in entries:
                self.entries.add(e)
        if not any(any(fl) for fl in flags):
            return
        for st, fl in zip(self.stats, flags):
            for i in range(3):
                st[i] += fl[i]

    def remove(self, entries, flags):
        for e in entries:
            self.entries.discard(e)
        if not any(any(fl) for fl in flags):
            return
        for st, fl in zip(self.stats, flags):
            for i in range(3):
                st[i] -= fl[i]

    def lookup_keys(self, pos, value):
        """Keys an equality on field `pos` with `value` must visit."""
        desc = self.fields[pos][1] < 0
        keys = [_component(_asc_key(value), desc)]
        st = self.stats[pos]
        if type(value) is bool and st[2]:
            keys.append(_component(_asc_key(int(value)), desc))
        elif _is_num01(value) and st[1]:
            keys.append(_component(_asc_key(bool(value)), desc))
        return keys


def _indexable_spec(index_dict):
    key = index_dict.get('key') or []
    try:
        return all(int(d) in (1, -1) and not isinstance(d, bool)
                   for _, d in key) and bool(key)
    except (TypeError, ValueError):
        return False


def _store_key(doc_id):
    return helpers.hashdict(doc_id) if isinstance(doc_id, dict) else doc_id


def _eq_scalar(v):
    return not isinstance(v, (dict, list, tuple) + filtering._RE_TYPES)  # pylint: disable=protected-access


def _eq_conditions(spec, out):
    """Collect field -> candidate values from top-level equalities / $in
    (and those inside a top-level $and).  Each is a necessary condition."""
    if not isinstance(spec, dict):
        return out
    for k, v in spec.items():
        if k == '$and' and isinstance(v, list):
            for sub in v:
                _eq_conditions(sub, out)
            continue
        if not isinstance(k, str) or k.startswith('$'):
            continue
        vals = None
        if isinstance(v, dict):
            if v and all(isinstance(o, str) and o.startswith('$') for o in v):
                if '$eq' in v and _eq_scalar(v['$eq']):
                    vals = [v['$eq']]
                elif ('$in' in v and isinstance(v['$in'], (list, tuple))
                      and all(_eq_scalar(x) for x in v['$in'])):
                    vals = list(v['$in'])
        elif _eq_scalar(v):
            vals = [v]
        if vals is not None and (k not in out or len(vals) < len(out[k])):
            out[k] = vals
    return out


_CMP_OPS = {'$lt': operator.lt, '$lte': operator.le, '$gt': operator.gt, '$gte': operator.ge}


def _compile_rejects(spec, out):
    """Cheap checks that can prove a document does NOT match spec.

    Each is (path parts, op, operand), applied only when the document holds
    a plain number or string at a path of plain dicts; then mongomock's
    semantics are Python ==, `in`, or a same-type comparison, reproduced
    here.  Anything else is left to mongomock's filter, which still decides
    every document that is not rejected, so results stay exact.
    """
    if not isinstance(spec, dict):
        return out
    for k, cond in spec.items():
        if k == '$and' and isinstance(cond, list):
            for sub in cond:
                _compile_rejects(sub, out)
            continue
        if not isinstance(k, str) or k.startswith('$'):
            continue
        parts = k.split('.')
        if isinstance(cond, dict):
            if not cond or not all(isinstance(o, str) and o.startswith('$') for o in cond):
                continue
            for o, sv in cond.items():
                if o in ('$eq', '$ne'):
                    if _eq_scalar(sv):
                        out.append((parts, o, sv))
                elif o in ('$in', '$nin'):
                    if isinstance(sv, (list, tuple)) and all(_eq_scalar(x) for x in sv):
                        out.append((parts, o, sv))
                elif o in _CMP_OPS:
                    try:
                        rank = filtering._get_compare_type(sv)  # pylint: disable=protected-access
                    except NotImplementedError:
                        continue
                    out.append((parts, _CMP_OPS[o], (rank, sv)))
        elif _eq_scalar(cond):
            out.append((parts, '$eq', cond))
    return out


def _rejected(checks, doc):
    for parts, op, sv in checks:
        v = doc
        for p in parts:
            if type(v) is not dict:  # pylint: disable=unidiomatic-typecheck
                v = NOTHING
                break
            v = v.get(p, NOTHING)
        if isinstance(v, str):
            rank = 15
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            rank = 10
        else:
            continue
        if op == '$eq':
            if not v == sv:
                return True
        elif op == '$ne':
            if v == sv:
                return True
        elif op == '$in':
            if v not in sv:
                return True
        elif op == '$nin':
            if v in sv:
                return True
        else:
            sv_rank, operand = sv
            if sv_rank != rank or not op(v, operand):
                return True
    return False


def _matcher(spec):
    """filter_applies(spec, doc), with a fast rejection pre-check."""
    checks = _compile_rejects(spec, [])
    if not checks:
        return lambda doc: filter_applies(spec, doc)
    filter_applies(spec, {})  # surface malformed filters even if all are rejected
    return lambda doc: not _rejected(checks, doc) and filter_applies(spec, doc)


def _norm_sort(sort):
    if not sort:
        return []
    if isinstance(sort, dict):
        sort = sort.items()
    try:
        return [(k, d) for k, d in sort]
    except (TypeError, ValueError):
        return None


def _mongomock_sort(dataset, sort):
    """mongomock's own sort (stable, applied key by key from the last)."""
    if isinstance(sort, dict):
        sort = sort.items()
    for sort_key, sort_direction in reversed(list(sort)):
        if sort_key == '$natural':
            if sort_direction < 0:
                dataset = iter(reversed(list(dataset)))
            continue
        if sort_key.startswith('$'):
            raise NotImplementedError(
                f'Sorting by {sort_key} is not implemented in mongomock yet')
        dataset = iter(sorted(
            dataset, key=lambda x, k=sort_key: filtering.resolve_sort_key(k, x),
            reverse=sort_direction < 0))
    return dataset


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
        self._engine = engine
        self.db_name = db_name
        self._seq_counter = itertools.count()
        self._key_seq = {}
        self._seq_key = {}
        self._sec = {}          # index name -> _SecondaryIndex
        self._reg = {}          # store key -> {index name: (entries, flags)}
        self._pending = []      # store keys touched in place, to re-index
        self._undo = None       # (document, its copy) for the update under way
        self.recording = None   # None, 'one' or 'multi' while in _update
        self.deferred = False   # while loading: index everything at the end

    # -- index maintenance -------------------------------------------------
    def _index_doc(self, key):
        doc = self._documents[key]
        seq = self._key_seq[key]
        reg = {}
        for name, idx in self._sec.items():
            entries, flags = idx.doc_entries(doc, seq)
            idx.add(entries, flags)
            reg[name] = (entries, flags)
        self._reg[key] = reg

    def _unindex_doc(self, key):
        reg = self._reg.pop(key, None)
        if reg:
            for name, (entries, flags) in reg.items():
                self._sec[name].remove(entries, flags)

    def _reindex(self, key):
        if self.deferred:
            return
        self._unindex_doc(key)
        if key in self._documents:
            self._index_doc(key)

    def flush_touched(self):
        while self._pending:
            pending, self._pending = self._pending, []
            for key in set(pending):
                self._reindex(key)

    def touch(self, doc):
        """`doc` is about to be changed in place by an update."""
        key = _store_key(doc['_id'])
        self._pending.append(key)
        self._engine.note_touch(self, key, doc)
        self._undo = (doc, copy.deepcopy(doc))
        self._engine.note_undo(self, key, self._undo[1])

    def undo_touch(self):
        """Put back the document an update failed on: mongomock applies
        operators one by one, and MongoDB changes a document all or not at
        all. Documents finished earlier in an update_many stay changed, as
        in MongoDB."""
        if self._undo is not None:
            doc, before = self._undo
            doc.clear()
            doc.update(copy.deepcopy(before))  # `before` stays the engine's undo image
        self._undo = None

    # -- mongomock store API -----------------------------------------------
    def restore(self, key, doc):
        """Put back `doc` (None: no document) under `key`, journaling nothing:
        undoes a change whose journal record could not be written."""
        if doc is None:
            if key in self._documents:
                del self[key]
        else:
            self[key] = doc

    def __setitem__(self, key, val):
        self._engine.note_undo(self, key, self._documents.get(key))
        if key not in self._key_seq:
            seq = next(self._seq_counter)
            self._key_seq[key] = seq
            self._seq_key[seq] = key
        super().__setitem__(key, val)
        self._reindex(key)
        self._engine.note_doc(self, key, val['_id'], forced=True)

    def __delitem__(self, key):
        self._engine.note_undo(self, key, self._documents[key])
        doc_id = self._documents[key]['_id']
        self._unindex_doc(key)
        super().__delitem__(key)
        seq = self._key_seq.pop(key, None)
        self._seq_key.pop(seq, None)
        self._engine.note_doc(self, key, doc_id, forced=True)

    def create(self):
        super().create()
        self._engine.note({'o': 'mk', 'd': self.db_name, 'c': self.name})

    def drop(self):
        super().drop()
        self._key_seq.clear()
        self._seq_key.clear()
        self._sec.clear()
        self._reg.clear()
        self._pending = []
        self._engine.note({'o': 'drop', 'd': self.db_name, 'c': self.name})

    def create_index(self, index_name, index_dict):
        unchanged = self.indexes.get(index_name) == index_dict
        super().create_index(index_name, index_dict)
        if unchanged and (index_name in self._sec or not _indexable_spec(index_dict)):
            return
        self._engine.note({'o': 'ix', 'd': self.db_name, 'c': self.name,
                           'n': index_name, 's': index_dict})
        self._sec.pop(index_name, None)
        for reg in self._reg.values():
            reg.pop(index_name, None)
        if not _indexable_spec(index_dict):
            return
        if self.deferred:
            self._sec[index_name] = _SecondaryIndex(index_dict['key'])
            return
        self.flush_touched()
        self._build_index(index_name, _SecondaryIndex(index_dict['key']))

    def _build_index(self, index_name, idx):
        all_entries = []
        all_flags = []
        key_seq = self._key_seq
        for key, doc in self._documents.items():
            entries, flags = idx.doc_entries(doc, key_seq[key])
            all_entries.extend(entries)
            all_flags.append(flags)
            if not self.deferred:
                self._reg.setdefault(key, {})[index_name] = (entries, flags)
        for flags in all_flags:
            idx.add((), flags)
        idx.add(all_entries, (), bulk=True)
        self._sec[index_name] = idx

    def finish_loading(self):
        """Index all documents at once after a bulk load (much faster than
        one SortedList insertion at a time)."""
        self.deferred = False
        self._reg = {key: {} for key in self._documents}
        for name, idx in list(self._sec.items()):
            self._build_index(name, _SecondaryIndex(idx.fields))

    def drop_index(self, index_name):
        super().drop_index(index_name)
        self._sec.pop(index_name, None)
        for reg in self._reg.values():
            reg.pop(index_name, None)
        self._engine.note({'o': 'dx', 'd': self.db_name, 'c': self.name,
                           'n': index_name})

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
        conds = _eq_conditions(spec, {})
        if not conds:
            return None
        if '_id' in conds:
            keys = set()
            for v in conds['_id']:
                if isinstance(v, dict):
                    return None
                try:
                    if v in self._documents:
                        keys.add(v)
                except TypeError:
                    return None
            return self._ordered_by_seq(keys), not sort
        norm_sort = _norm_sort(sort)
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
            if (norm_sort is not None and nranges == 1 and all(
                    isinstance(d, (int, float)) and d for _, d in norm_sort)):
                j = len(prefix)
                fixed = {f for (f, _), st in zip(idx.fields[:j], idx.stats) if not st[0]}
                wanted = [(f, 1 if d > 0 else -1) for f, d in norm_sort if f not in fixed]
                aligned = (wanted == idx.fields[j:]
                           and not any(st[0] for st in idx.stats[j:]))
            score = (len(prefix), aligned, -len(idx.fields))
            if best is None or score > best[0]:
                best = (score, name, idx, prefix, aligned)
        if best is None:
            return None
        _, _, idx, prefix, aligned = best
        per_field = [
            [k for v in conds[field] for k in idx.lookup_keys(pos, v)]
            for pos, field in enumerate(prefix)]
        ranges = list(itertools.product(*per_field))
        if aligned and len(ranges) == 1:
            return self._iter_range(idx, ranges[0]), True
        keys = set()
        seq_key = self._seq_key
        for lo in ranges:
            for e in idx.entries.irange(lo, lo + (_TOP,)):
                keys.add(seq_key[e[-1]])
        return self._ordered_by_seq(keys), not sort

    def _iter_range(self, idx, lo):
        docs = self._documents
        seq_key = self._seq_key
        for e in idx.entries.irange(lo, lo + (_TOP,)):
            yield docs[seq_key[e[-1]]]


class _DatabaseStore(mm_store.DatabaseStore):
    def __init__(self, engine, db_name):
        super().__init__()
        self._engine = engine
        self._db_name = db_name

    def __getitem__(self, col_name):
        try:
            return self._collections[col_name]
        except KeyError:
            col = self._collections[col_name] = _CollectionStore(
                col_name, self._engine, self._db_name)
            col.deferred = self._engine.replaying
            return col

    def rename(self, name, new_name):
        raise NotImplementedError('rename is not supported by the embedded store')


class _ServerStore(mm_store.ServerStore):
    def __init__(self, engine):
        super().__init__()
        self._engine = engine

    def __getitem__(self, db_name):
        try:
            return self._databases[db_name]
        except KeyError:
            db = self._databases[db_name] = _DatabaseStore(self._engine, db_name)
            return db


# ---------------------------------------------------------------------------
# Journal, snapshot and the per-client lock (the file format and its reading
# live in banyan.store.journal).
# ---------------------------------------------------------------------------

_frame = journal.frame


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_fdatasync = getattr(os, 'fdatasync', os.fsync)


class _Engine:
    """Lock, change tracking, journal and snapshots of one EmbeddedClient.

    A call's changes are applied in memory under the lock and its journal
    record is appended before the lock is released; when the record cannot
    be written (ENOSPC, EIO, EROFS) the changes are rolled back, still under
    the lock, so no other call ever saw them, and the call raises
    StoreUnavailable. The next call simply tries again: the store serves
    again by itself once space is back.
    """

    def __init__(self, data_dir, compact_bytes):
        self.data_dir = os.path.abspath(data_dir)
        self.journal_path = os.path.join(self.data_dir, _JOURNAL)
        self.snapshot_path = os.path.join(self.data_dir, _SNAPSHOT)
        self.compact_bytes = compact_bytes
        self.next_compact = compact_bytes
        self.lock = threading.RLock()
        self.sync_lock = threading.Lock()
        self.batch = threading.local()
        self.depth = 0
        self.events = []
        self.docinfo = {}
        self.undo = {}          # (id(store), key) -> (store, key, document before the call or None)
        self.carried = []       # schema actions of a rolled-back call, journaled with the next record
        self.tail_dirty = False  # a failed append may have left part of a record at the end
        self.broken = None      # why every call is refused (a failed sync), or None
        self.replaying = False
        self.closed = False
        self.server_store = None
        self.fd = None
        self.lock_fd = None
        self.journal_size = 0
        self.written_seq = 0
        self.synced_seq = 0

    # -- change tracking ---------------------------------------------------
    def note(self, action):
        if not self.replaying:
            self.events.append(('raw', action))

    def note_undo(self, store, key, before):
        """`store[key]` is about to change; `before` is what to put back
        (None: nothing) if the call's record cannot be written."""
        if self.replaying:
            return
        k = (id(store), key)
        if k not in self.undo:
            self.undo[k] = (store, key, before)

    def note_doc(self, store, key, doc_id, forced=False, before=None):
        if self.replaying:
            return
        k = (id(store), key)
        info = self.docinfo.get(k)
        if info is None:
            self.docinfo[k] = [store, key, doc_id, before, forced]
        elif forced:
            info[4] = True
        self.events.append(('doc', k))

    def note_touch(self, store, key, doc):
        if self.replaying:
            return
        k = (id(store), key)
        if k in self.docinfo:
            self.events.append(('doc', k))
        else:
            self.note_doc(store, key, doc['_id'], before=bson.encode(doc))

    # -- operations --------------------------------------------------------
    @contextlib.contextmanager
    def op(self):
        """Run one client call atomically; journal its changes durably."""
        self.lock.acquire()
        seq = None
        try:
            if self.closed:
                raise InvalidOperation('Cannot use the embedded store after close()')
            if self.broken:
                raise StoreUnavailable(self.broken)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    if self.events:
                        seq = self._commit()
                    self.undo = {}
        finally:
            self.lock.release()
        if seq is not None:
            if getattr(self.batch, 'seq', None) is not None:
                self.batch.seq = max(self.batch.seq, seq)
            else:
                self._sync(seq)

    @contextlib.contextmanager
    def one_sync(self):
        """Writes of this thread inside share one fdatasync, done on exit:
        a request's writes are durable before its answer, for one sync
        instead of one per write. The journal is sequential, so any later
        sync (another thread's) covers them too."""
        if getattr(self.batch, 'seq', None) is not None:  # nested: the outer one syncs
            yield
            return
        self.batch.seq = 0
        try:
            yield
        finally:
            seq, self.batch.seq = self.batch.seq, None
            if seq:
                self._sync(seq)

    def _commit(self):
        """Append the call's record, or roll its changes back and raise."""
        events, docinfo, undo = self.events, self.docinfo, self.undo
        self.events, self.docinfo, self.undo = [], {}, {}
        carried, self.carried = self.carried, []
        try:
            actions = carried + self._actions(events, docinfo)
            if not actions:
                return None
            self._append(_frame(actions))
        except BaseException as err:
            self._roll_back(undo)
            # creations, drops and indexes stay in memory: journal them next time
            self.carried = carried + [payload for kind, payload in events if kind == 'raw']
            if isinstance(err, OSError):
                raise StoreUnavailable.from_os_error(err, 'writing the journal', self.journal_path) from err
            raise
        self.written_seq += 1
        seq = self.written_seq
        if self.journal_size > self.next_compact:
            self.compact()
        return seq

    @staticmethod
    def _actions(events, docinfo):
        last = {}
        for i, (kind, k) in enumerate(events):
            if kind == 'doc':
                last[k] = i
        actions = []
        for i, (kind, payload) in enumerate(events):
            if kind == 'raw':
                actions.append(payload)
                continue
            if last[payload] != i:
                continue
            store, key, doc_id, before, forced = docinfo[payload]
            doc = store._documents.get(key)  # pylint: disable=protected-access
            if doc is None:
                actions.append({'o': 'x', 'd': store.db_name, 'c': store.name, 'id': doc_id})
                continue
            raw = bson.encode(doc)
            if forced or raw != before:
                actions.append({'o': 'p', 'd': store.db_name, 'c': store.name,
                                'docs': [RawBSONDocument(raw)]})
        return actions

    def _append(self, record):
        """Write `record` at the end of the journal, whole or not at all."""
        if self.tail_dirty:  # what a failed append left, cut before anything follows it
            os.ftruncate(self.fd, self.journal_size)
            self.tail_dirty = False
        if self.journal_size == 0:
            record = journal.format_record() + record
        try:
            _write_all(self.fd, record)
        except BaseException:
            self.tail_dirty = True
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.journal_size)
                self.tail_dirty = False
            raise
        self.journal_size += len(record)

    def _roll_back(self, undo):
        self.replaying = True  # nothing of the undoing is journaled
        try:
            for store, key, before in undo.values():
                store.restore(key, before)
        finally:
            self.replaying = False

    def _sync(self, seq):
        """Group commit: one fdatasync covers every record written so far.
        A failed sync leaves records in memory that may not be on disk, so
        the store then refuses every call until it is opened again."""
        if self.synced_seq >= seq:
            return
        with self.sync_lock:
            if self.synced_seq >= seq or self.fd is None:
                return
            if self.broken:
                raise StoreUnavailable(self.broken)
            target = self.written_seq
            try:
                _fdatasync(self.fd)
            except OSError as err:
                failure = StoreUnavailable.from_os_error(err, 'syncing the journal', self.journal_path)
                self.broken = ('the embedded store stopped after a failed journal sync (%s): the last '
                               'changes may not be on disk, so it refuses every request until the '
                               'server is restarted' % (err.strerror or err))
                logger.error('%s', self.broken)
                raise failure from err
            if target > self.synced_seq:
                self.synced_seq = target

    # -- files -------------------------------------------------------------
    def open(self, server_store):
        self.server_store = server_store
        os.makedirs(self.data_dir, exist_ok=True)
        if fcntl is not None:
            self.lock_fd = os.open(os.path.join(self.data_dir, journal.LOCKFILE),
                                   os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(self.lock_fd)
                self.lock_fd = None
                raise RuntimeError(
                    f'{self.data_dir} is in use by another Banyan process') from err
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.snapshot_path + '.tmp')  # a compaction cut short
        snapshot = journal.read(self.snapshot_path)
        if snapshot is not None:
            self._check_snapshot(snapshot)
        log = journal.read(self.journal_path)
        if log is not None and log.damage:
            raise StoreCorrupt(log.refusal(self.data_dir))
        self.replaying = True
        try:
            for scan in (snapshot, log):
                for offset, _, actions in scan.records if scan else ():
                    self._replay(scan.path, offset, actions)
        finally:
            self.replaying = False
        for db_store in self.server_store._databases.values():  # pylint: disable=protected-access
            for store in db_store._collections.values():  # pylint: disable=protected-access
                store.finish_loading()
        self.fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if log is not None and log.tail is not None:
            logger.warning('journal %s: dropped a torn last record, %d bytes at offset %d (%s): '
                           'a write cut short by a crash, never acknowledged',
                           log.path, log.tail.length, log.tail.offset, log.tail.reason)
            os.ftruncate(self.fd, log.valid_end)
            os.fsync(self.fd)
        self.journal_size = log.valid_end if log is not None else 0
        journal.fsync_dir(self.data_dir)
        replayed = log is not None and any(True for _ in log.actions())
        if replayed:
            logger.info('replayed %d journal records from %s', len(log.records), log.path)
        if replayed or snapshot is None or snapshot.version < journal.FORMAT_VERSION:
            self.compact()

    def _check_snapshot(self, scan):
        """A snapshot is written whole and renamed into place: any damage,
        even at its end, is corruption."""
        bad = scan.damage + ([scan.tail] if scan.tail is not None else [])
        complete = any(a.get('o') == 'end' for a in scan.actions())
        if bad or not complete:
            what = bad[0].describe() if bad else 'it has no end record'
            raise StoreCorrupt(
                '%s is damaged: %s. The store refuses to start rather than lose what it holds. See '
                'the damage with `banyan store check %s`, then salvage every valid record with '
                '`banyan store repair %s` (it keeps the original file).'
                % (scan.path, what, self.data_dir, self.data_dir))

    def _replay(self, path, offset, actions):
        for action in actions:
            if action.get('o') in ('format', 'end'):
                continue
            try:
                self._apply(action)
            except Exception as err:  # pylint: disable=broad-except
                raise StoreCorrupt('%s: the record at offset %d cannot be applied (%s); see '
                                   '`banyan store check %s`' % (path, offset, err, self.data_dir)) from err

    def _apply(self, action):
        """Apply one journal action (idempotent)."""
        store = self.server_store[action['d']][action['c']]
        op = action['o']
        if op == 'p':
            for doc in action['docs']:
                store[_store_key(doc['_id'])] = doc
        elif op == 'x':
            key = _store_key(action['id'])
            if key in store._documents:  # pylint: disable=protected-access
                del store[key]
        elif op == 'drop':
            store.drop()
        elif op == 'mk':
            store.create()
        elif op == 'ix':
            spec = dict(action['s'])
            spec['key'] = [tuple(k) for k in spec['key']]
            store.create_index(action['n'], spec)
        elif op == 'dx':
            if action['n'] in store.indexes:
                store.drop_index(action['n'])
        else:
            raise RuntimeError(f'unknown journal action {op!r}')

    def _snapshot_frames(self):
        yield journal.format_record()
        for db_name, db_store in list(self.server_store._databases.items()):  # pylint: disable=protected-access
            for col_name, store in list(db_store._collections.items()):  # pylint: disable=protected-access
                if not store.is_created:
                    continue
                head = [{'o': 'mk', 'd': db_name, 'c': col_name}]
                for name, spec in store.indexes.items():
                    head.append({'o': 'ix', 'd': db_name, 'c': col_name, 'n': name, 's': spec})
                yield _frame(head)
                docs = list(store._documents.values())  # pylint: disable=protected-access
                for i in range(0, len(docs), _SNAPSHOT_CHUNK):
                    yield _frame([{'o': 'p', 'd': db_name, 'c': col_name,
                                   'docs': docs[i:i + _SNAPSHOT_CHUNK]}])
        yield _frame([{'o': 'end'}])

    def compact(self):
        """Write a snapshot atomically, then empty the journal. Fails safe:
        when the snapshot cannot be written (no space) the journal is kept
        as it is, and compaction is tried again after more writes."""
        tmp = self.snapshot_path + '.tmp'
        try:
            with open(tmp, 'wb') as f:
                for frame in self._snapshot_frames():
                    f.write(frame)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.snapshot_path)
            journal.fsync_dir(self.data_dir)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            self.next_compact = self.journal_size + max(self.compact_bytes // 4, 1 << 20)
            logger.warning('could not compact the embedded store in %s (%s); the journal is kept '
                           'as it is and compaction is tried again later', self.data_dir, err)
            return False
        # The snapshot holds everything the journal does; replaying the
        # journal over it is harmless, so a crash before this is too.
        try:
            os.ftruncate(self.fd, 0)
            self.journal_size = 0
            self.tail_dirty = False
            os.fsync(self.fd)
        except OSError as err:
            logger.warning('could not empty the journal %s after compaction (%s)', self.journal_path, err)
        self.next_compact = self.compact_bytes
        self.synced_seq = self.written_seq
        logger.debug('compacted embedded store in %s', self.data_dir)
        return True

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
            with self.sync_lock:
                if self.fd is not None:
                    with contextlib.suppress(OSError):
                        os.fsync(self.fd)
                    os.close(self.fd)
                    self.fd = None
                    self.synced_seq = self.written_seq
            if self.lock_fd is not None:
                os.close(self.lock_fd)  # releases the flock
                self.lock_fd = None


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
                results = [helpers.make_datetime_timezone_aware_in_document(x)
                           for x in results]
            self._results = results
            self._cache_key = wanted
            self._window_key = None
        results = self._results
        if with_limit_and_skip:
            # `__next__` asks for the window once per document: slicing it
            # anew each time made iterating n documents cost n squared.
            key = (self._skip, self._limit)
            if self._window_key != key:
                window = results[self._skip:]
                if self._limit:
                    window = window[:abs(self._limit)]
                self._window, self._window_key = window, key
            results = self._window
        return results

    def clone(self):
        cursor = _Cursor(self.collection, self._spec, self._sort, self._projection,
                         self._skip, self._limit)
        cursor._factory = self._factory
        return cursor


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
        raise TypeError('EmbeddedCollection cannot be pickled')

    # -- reads ---------------------------------------------------------------
    def find(self, filter=None, projection=None, skip=0, limit=0,  # pylint: disable=redefined-builtin
             no_cursor_timeout=False, cursor_type=None, sort=None,
             allow_partial_results=False, oplog_replay=False, modifiers=None,
             batch_size=0, manipulate=True, collation=None, session=None,
             max_time_ms=None, allow_disk_use=False, **kwargs):
        spec = {} if filter is None else filter
        mm_collection.validate_is_mapping('filter', spec)
        for kwarg, value in kwargs.items():
            if value:
                raise OperationFailure("Unrecognized field '%s'" % kwarg)
        return _Cursor(self, spec, sort, projection, skip, limit,
                       collation=collation).max_time_ms(max_time_ms).allow_disk_use(allow_disk_use)

    def find_one(self, filter=None, *args, **kwargs):  # pylint: disable=keyword-arg-before-vararg,redefined-builtin
        if filter is None:
            filter = {}
        if not isinstance(filter, collections.abc.Mapping):
            filter = {'_id': filter}
        with self._engine.op():
            for doc in self.find(filter, *args, **kwargs).limit(-1):
                return doc
        return None

    def _get_dataset(self, spec, sort, fields, as_class, stop=None):
        """Matching documents, sorted and projected, computed under the lock."""
        with self._engine.op():
            store = self._store
            plan = store.plan(spec, sort)
            if store.is_empty:
                filter_applies(spec, {})  # validate the filter like mongomock
            if plan is None:
                docs, ordered = list(store._documents.values()), not sort  # pylint: disable=protected-access
            else:
                docs, ordered = plan
            match = _matcher(spec)
            matched = (d for d in docs if match(d))
            if sort and not ordered:
                matched = _mongomock_sort(list(matched), sort)
            out = []
            if stop is not None and stop <= 0:
                return out
            for doc in matched:
                out.append(self._copy_only_fields(doc, fields, as_class))
                if stop is not None and len(out) >= stop:
                    break
            return out

    def _iter_documents(self, filter):  # pylint: disable=redefined-builtin
        store = self._store
        if store.is_empty:
            filter_applies(filter, {})
        recording = store.recording
        plan = store.plan(filter, None)
        if plan is None:
            docs = list(store._documents.values())  # pylint: disable=protected-access
        else:
            docs = plan[0]
            if recording == 'multi':
                docs = list(docs)
        return self._yield_matching(_matcher(filter), docs, store, recording)

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
            return super().count_documents(filter, **kwargs)

    def estimated_document_count(self, **kwargs):
        with self._engine.op():
            if not kwargs:
                return len(self._store._documents)  # pylint: disable=protected-access
            return super().estimated_document_count(**kwargs)

    def aggregate(self, pipeline, session=None, **unused_kwargs):
        """mongomock's pipeline over copies of the matching documents. A
        leading `$match` uses the indexes, a following inclusion `$project`
        copies only its fields, and the stages after it run outside the
        lock (they only see those copies)."""
        if session:
            raise NotImplementedError('the embedded store has no sessions')
        pipeline = list(pipeline)
        spec, projection = {}, None
        if pipeline and _stage_name(pipeline[0]) == '$match':
            spec = pipeline.pop(0)['$match']
        if pipeline and _inclusion_projection(pipeline[0]):
            projection = pipeline.pop(0)['$project']
        with self._engine.op():
            docs = list(self.find(spec, projection))
        for i, stage in enumerate(pipeline):
            fast = _fast_stage(pipeline, i)
            result = fast(docs, next(iter(stage.values()))) if fast else None
            if result is None:
                result = list(mm_aggregate.process_pipeline(docs, self.database, [stage], None))
            docs = result
        return mm_command_cursor.CommandCursor(docs)

    def list_indexes(self, session=None):
        with self._engine.op():
            return iter(list(super().list_indexes(session=session)))

    # -- writes --------------------------------------------------------------
    def _update(self, spec, document, upsert=False, manipulate=False, multi=False,
                check_keys=False, hint=None, session=None, collation=None, let=None,
                array_filters=None, **kwargs):
        with self._engine.op():
            store = self._store
            previous = store.recording
            store.recording = 'multi' if multi else 'one'
            try:
                return super()._update(
                    spec, document, upsert=upsert, manipulate=manipulate, multi=multi,
                    check_keys=check_keys, hint=hint, session=session, collation=collation,
                    let=let, array_filters=array_filters, **kwargs)
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

    def _find_and_modify(self, query, projection=None, update=None, upsert=False,
                         sort=None, return_document=ReturnDocument.BEFORE, session=None,
                         **kwargs):
        with self._engine.op():
            if session:
                mm_collection.raise_not_implemented(
                    'session', 'Mongomock does not handle sessions yet')
            remove = kwargs.get('remove', False)
            if kwargs.get('new', False) and remove:
                raise OperationFailure("remove and returnNew can't co-exist")
            if not (remove or update):
                raise ValueError('Must either update or remove')
            if remove and update:
                raise ValueError("Can't do both update and remove")
            old = self.find_one(query, projection=projection, sort=sort)
            if old is None and not upsert:
                return None
            target = query
            if old is not None:
                if '_id' in old:
                    target = {'_id': old['_id']}
                else:
                    target = {'_id': self.find_one(query, projection={'_id': 1}, sort=sort)['_id']}
            if remove:
                self.delete_one(target)
            else:
                updated = self._update(target, update, upsert)
                if updated['upserted'] is not None:
                    target = {'_id': updated['upserted']}
            if return_document is ReturnDocument.AFTER or kwargs.get('new'):
                return self.find_one(target, projection)
            return old

    def create_index(self, key_or_list, cache_for=300, session=None, **kwargs):
        with self._engine.op():
            try:
                return super().create_index(key_or_list, cache_for, session=session, **kwargs)
            except OperationFailure as err:
                if err.code is None and 'already exists with different options' in str(err):
                    raise OperationFailure(str(err), code=85) from err
                raise

    def bulk_write(self, requests, ordered=True, bypass_document_validation=False,
                   session=None, **unused_kwargs):
        """pymongo bulk_write, run as one atomic call with one journal record.

        (mongomock 4.3's own bulk_write breaks on pymongo >= 4.9 operations.)
        """
        with self._engine.op():
            result = {'writeErrors': [], 'writeConcernErrors': [], 'nInserted': 0,
                      'nUpserted': 0, 'nMatched': 0, 'nModified': 0, 'nRemoved': 0,
                      'upserted': []}
            for index, request in enumerate(requests):
                try:
                    self._bulk_one(index, request, result)
                except (DuplicateKeyError, OperationFailure) as err:
                    result['writeErrors'].append({
                        'index': index, 'code': getattr(err, 'code', None) or 2,
                        'errmsg': str(err), 'op': request})
                    if ordered:
                        break
            if result['writeErrors']:
                raise BulkWriteError(result)
            return BulkWriteResult(result, True)

    def _bulk_one(self, index, request, result):
        if isinstance(request, pymongo.InsertOne):
            self.insert_one(request._doc)  # pylint: disable=protected-access
            result['nInserted'] += 1
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
                result['nUpserted'] += 1
                result['upserted'].append({'index': index, '_id': res.upserted_id})
            else:
                result['nMatched'] += res.matched_count
                result['nModified'] += res.modified_count
        elif isinstance(request, (pymongo.DeleteOne, pymongo.DeleteMany)):
            flt = request._filter  # pylint: disable=protected-access
            if isinstance(request, pymongo.DeleteOne):
                result['nRemoved'] += self.delete_one(flt).deleted_count
            else:
                result['nRemoved'] += self.delete_many(flt).deleted_count
        else:
            raise TypeError(f'{request!r} is not a valid request')

    def drop_indexes(self, session=None):
        with self._engine.op():
            if session:
                mm_collection.raise_not_implemented(
                    'session', 'Mongomock does not handle sessions yet')
            for name in list(self._store.indexes):
                self._store.drop_index(name)

    def rename(self, new_name, session=None, **kwargs):
        raise NotImplementedError('rename is not supported by the embedded store')

    def with_options(self, codec_options=None, read_preference=None, write_concern=None,
                     read_concern=None):
        base = super().with_options(codec_options=codec_options,
                                    read_preference=read_preference,
                                    write_concern=write_concern, read_concern=read_concern)
        if base is self:
            return self
        return EmbeddedCollection(
            self.database, self.name, _db_store=self._db_store,
            write_concern=base.write_concern, read_concern=base.read_concern,
            read_preference=base.read_preference, codec_options=base.codec_options)


for _name in ('insert_one', 'insert_many', 'update_one', 'update_many', 'replace_one',
              'delete_one', 'delete_many', 'distinct', 'create_indexes',
              'drop_index', 'drop', 'index_information', 'find_one_and_delete',
              'find_one_and_replace', 'find_one_and_update'):
    setattr(EmbeddedCollection, _name, _locked(_name))
del _name


class EmbeddedDatabase(mm_database.Database):
    """mongomock Database handing out EmbeddedCollections."""

    def get_collection(self, name, codec_options=None, read_preference=None,
                       write_concern=None, read_concern=None):
        with self._client._engine.op():  # pylint: disable=protected-access
            if read_preference is not None:
                mm_read_preferences.ensure_read_preference_type('read_preference', read_preference)
            mm_codec_options.is_supported(codec_options)
            try:
                return self._collection_accesses[name].with_options(
                    codec_options=codec_options or self._codec_options,
                    read_preference=read_preference or self.read_preference,
                    read_concern=read_concern, write_concern=write_concern)
            except KeyError:
                self._ensure_valid_collection_name(name)
                collection = self._collection_accesses[name] = EmbeddedCollection(
                    self, name=name, read_concern=read_concern, write_concern=write_concern,
                    read_preference=read_preference or self.read_preference,
                    codec_options=codec_options or self._codec_options, _db_store=self._store)
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
        raise NotImplementedError('rename is not supported by the embedded store')

    def with_options(self, codec_options=None, read_preference=None, write_concern=None,
                     read_concern=None):
        """write_concern is accepted and ignored: every write is fsynced."""
        mm_codec_options.is_supported(codec_options)
        if (read_preference is None or read_preference == self._read_preference) \
                and codec_options is None:
            return self
        return EmbeddedDatabase(
            self._client, self.name, self._store,
            read_preference=read_preference or self._read_preference,
            codec_options=codec_options or self._codec_options,
            read_concern=read_concern or self._read_concern)


class EmbeddedClient(mongomock.MongoClient):
    """MongoClient-shaped embedded store persisted under data_dir.

    Opening loads the snapshot and replays the journal; only one process may
    open a data_dir at a time.  get_database(None) returns 'banyan'.
    """

    def __init__(self, data_dir, *, compact_bytes=DEFAULT_COMPACT_BYTES):
        # Set before mongomock's __init__: its __getattr__ maps unknown
        # attributes to databases.
        self._engine = _Engine(data_dir, compact_bytes)
        super().__init__(tz_aware=True, _store=_ServerStore(self._engine))
        self._engine.open(self._store)
        self.data_dir = self._engine.data_dir

    def __repr__(self):
        return f'EmbeddedClient({self._engine.data_dir!r})'

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def get_database(self, name=None, codec_options=None, read_preference=None,
                     write_concern=None, read_concern=None):
        if name is None:
            name = DEFAULT_DATABASE
        with self._engine.op():
            db = self._database_accesses.get(name)
            if db is None:
                db = self._database_accesses[name] = EmbeddedDatabase(
                    self, name, read_preference=read_preference or self.read_preference,
                    codec_options=codec_options or self._codec_options,
                    _store=self._store[name], read_concern=read_concern)
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
        raise ConfigurationError('the embedded store does not support sessions')

    def close(self):
        """Flush and close the journal; the client is unusable afterwards."""
        self._engine.close()
