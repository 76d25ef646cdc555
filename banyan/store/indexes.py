"""Secondary indexes: documents' keys in index order, in SortedLists.

Index keys are a type-ranked, natively comparable form of BSON values,
ordered like mongomock's sort; `SecondaryIndex` keeps one entry per
(key combination, document sequence number).
"""

import array
import datetime
import itertools
import operator

from bson.objectid import ObjectId
from mongomock import filtering
from mongomock.filtering import NOTHING, iter_key_candidates
from sortedcontainers import SortedList


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


TOP = _Top()


def _bson_cmp(op, a, b):
    try:
        return filtering.bson_compare(op, a, b)
    except (TypeError, NotImplementedError):
        return op((type(a).__name__, repr(a)), (type(b).__name__, repr(b)))


class _Bson:
    """Wraps values without a native order (dicts, lists, binary...)."""

    __slots__ = ("v",)

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

    __slots__ = ("v",)

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


_EPOCH = datetime.datetime(1970, 1, 1)
_MICROSECOND = datetime.timedelta(microseconds=1)


def asc_key(v):
    """(1, bson type rank, value) ordered like mongomock's resolve_sort_key.

    Python-equal values of the same rank get equal keys, which is what
    mongomock's equality matching uses. ObjectIds and datetimes are keyed
    by integers in the same order (their bytes, microseconds since 1970):
    ints compare in C where ObjectIds compare in Python, a descending one
    is its negation rather than a wrapper, and a snapshot writes and reads
    them many times faster (`banyan.store.state`).
    """
    t = type(v)
    if t is str:
        return (1, 15, v)
    if t is bool:
        return (1, 40, v)
    if t is ObjectId:
        return (1, 35, int.from_bytes(v.binary, "big"))
    if v is None or v is NOTHING:
        return (1, 5, 0)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v != v:  # NaN: keep the SortedList's order total
            return (1, 9, 0)
        return (1, 10, v)
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = (v - v.utcoffset()).replace(tzinfo=None)
        return (1, 45, (v - _EPOCH) // _MICROSECOND)
    return (1, _rank(v), _Bson(v))


EMPTY_KEY = (0, 0, 0)  # an empty array: sorts first, equals no query value


def _component(key, desc):
    if not desc:
        return key
    v = key[2]
    if isinstance(v, (int, float)):  # bool, and BSON's Int64 of a decoded document, too
        v = -v
    else:
        v = _Rev(v)
    return (-key[0], -key[1], v)


_EMPTY_ASC = _component(EMPTY_KEY, False)
_EMPTY_DESC = _component(EMPTY_KEY, True)


def _field_elements(field, doc, parts=None):
    """Values of `field` that mongomock equality can match, and whether the
    field is multikey (array / several candidates) for this document."""
    if parts is not None:  # the common shapes, without mongomock's walk
        v = doc
        for part in parts:
            if type(v) is not dict:  # pylint: disable=unidiomatic-typecheck
                break
            v = v.get(part, NOTHING)
        else:
            if type(v) is list and len(parts) == 1:  # pylint: disable=unidiomatic-typecheck
                return v, True
            if not isinstance(v, (list, tuple, dict)):
                return [v], False
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


def sorted_list(values):
    """A SortedList of `values`, a list already in order (as a SortedList
    gave it), without sorting it again: at start-up, comparing a million
    index entries whose keys are ObjectIds took seconds. Falls back to
    sorting where sortedcontainers' layout is not the one known."""
    out = SortedList()
    layout = ("_lists", "_maxes", "_index", "_len", "_load")
    if not values or not all(hasattr(out, name) for name in layout):
        out.update(values)
        return out
    load = out._load  # pylint: disable=protected-access
    out._lists = [values[i : i + load] for i in range(0, len(values), load)]  # pylint: disable=protected-access
    out._maxes = [part[-1] for part in out._lists]  # pylint: disable=protected-access
    out._len = len(values)  # pylint: disable=protected-access
    del out._index[:]  # pylint: disable=protected-access
    return out


def _is_num01(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (v == 0 or v == 1)


#: Index components and flags of plain values, one object for all the
#: documents that share them (a state, a priority, False flags...): most of
#: an index's memory otherwise goes to equal little tuples.
_SHARED = {}
_SHARED_MAX = 100000
_PLAIN = (str, int, float, bool, type(None))


def _shared(thing):
    try:
        return _SHARED[thing]
    except KeyError:
        if len(_SHARED) < _SHARED_MAX:
            _SHARED[thing] = thing
        return thing
    except TypeError:  # a descending string (_Rev) has no hash
        return thing


#: Items of a long list a snapshot's state pickles per slice (`in_slices`).
SLICE = 4096


class _Slice(list):
    """Part of a long list of a snapshot's state. Pickling a list runs in C
    from its first item to its last, holding every other thread up (a
    million index keys: most of a second); each slice is pickled through a
    call back into Python, where they may take their turn."""

    __slots__ = ()

    def __reduce__(self):
        return (_slice, (list(self),))


def _slice(items):
    return items


def in_slices(values):
    """`values` (a list) as a list of slices, for a snapshot's state."""
    return [_Slice(values[i : i + SLICE]) for i in range(0, len(values), SLICE)]


def joined(slices):
    """The list `in_slices` cut into `slices`, whole again."""
    return list(itertools.chain.from_iterable(slices))


class SecondaryIndex:
    """Entries `(component per field..., seq)` in index order.

    stats[i] = [docs multikey on field i, docs with a bool in field i,
    docs with a number equal to 0 or 1 in field i]; they decide whether
    the index can serve a sort and which bool/number keys an equality
    lookup must also visit (Python, hence mongomock, has True == 1).
    """

    def __init__(self, fields):
        self.fields = [(f, int(d)) for f, d in fields]
        self._plan = [(f, d < 0, f.split(".") if "." in f else None) for f, d in self.fields]
        #: The top-level fields a document's entries come from (`FieldChanges`).
        self.reads = frozenset(f.split(".")[0] for f, _ in self.fields)
        self.entries = SortedList()
        self.stats = [[0, 0, 0] for _ in self.fields]

    def __getstate__(self):
        """As a snapshot keeps it (`banyan.store.state`): the entries in
        order, as a column per field (no tuple per entry to write) and the
        sequence numbers (an array: read back, each number is then one
        object shared with the collection's tables, `take_seqs`)."""
        entries = self.entries
        return {
            "fields": self.fields,
            "columns": [in_slices([e[i] for e in entries]) for i in range(len(self.fields))],
            "seqs": array.array("q", [e[-1] for e in entries]),
            "stats": self.stats,
        }

    def __setstate__(self, state):
        self.__init__(state["fields"])
        self.stats = [list(st) for st in state["stats"]]
        columns, numbers = [joined(column) for column in state["columns"]], state["seqs"]
        if len(columns) != len(self.fields) or any(len(c) != len(numbers) for c in columns):
            raise ValueError("a column per field, an entry per sequence number")
        self.loaded = (columns, numbers)

    def frozen(self):
        """A copy that later writes do not change, for a snapshot written
        outside the lock: the entries as a list (their tuples are shared,
        never changed), which is all `__getstate__` reads."""
        out = SecondaryIndex.__new__(SecondaryIndex)
        out.fields, out.reads = self.fields, self.reads
        out.entries = list(self.entries)
        out.stats = [list(st) for st in self.stats]
        return out

    def take_seqs(self, seqs):
        """Make the entries of an index read from a snapshot, with the
        sequence numbers `seqs` ({number: the collection's object})."""
        columns, numbers = self.loaded
        del self.loaded
        self.entries = sorted_list(list(zip(*columns, [seqs[n] for n in numbers])))

    def doc_entries(self, doc, seq, memo=None):
        """(entries, flags) of `doc`. `memo` ({}), shared by the indexes of
        one document, lets them share the components of its plain fields
        (an `_id` or a date in four indexes is then kept once)."""
        per_field = []
        flags = []
        for field, desc, dotted in self._plan:
            if not dotted:
                if memo is not None:
                    got = memo.get((field, desc))
                    if got is not None:
                        per_field.append(got[0])
                        flags.append(got[1])
                        continue
                v = doc.get(field, NOTHING)
                if not isinstance(v, (list, tuple)):  # fast path: a plain scalar
                    component = _component(asc_key(v), desc)
                    if type(v) in _PLAIN:  # pylint: disable=unidiomatic-typecheck
                        component = _shared(component)
                    got = ((component,), _shared((False, type(v) is bool, _is_num01(v))))
                    if memo is not None:
                        memo[(field, desc)] = got
                    per_field.append(got[0])
                    flags.append(got[1])
                    continue
            elems, multi = _field_elements(field, doc, dotted or [field])
            keys = []
            has_bool = has_num = False
            for e in elems:
                if type(e) is bool:
                    has_bool = True
                elif _is_num01(e):
                    has_num = True
                k = _component(asc_key(e), desc)
                if k not in keys:
                    keys.append(k)
            if not keys:
                keys.append(_component(EMPTY_KEY, desc))
                multi = True
            per_field.append(keys)
            flags.append(_shared((multi, has_bool, has_num)))
        if per_field[0] == [_EMPTY_ASC] or per_field[0] == [_EMPTY_DESC]:
            # An empty array in the first field: no lookup (an equality or
            # a lower bound on it) can reach the entry, so none is kept.
            return [], _shared(tuple(flags))
        entries = [combo + (seq,) for combo in itertools.product(*per_field)]
        return entries, _shared(tuple(flags))

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

    def add_flags(self, flags, times):
        """Count `flags` (of doc_entries) for `times` documents."""
        if not any(any(fl) for fl in flags):
            return
        for st, fl in zip(self.stats, flags):
            for i in range(3):
                st[i] += fl[i] * times

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
        keys = [_component(asc_key(value), desc)]
        st = self.stats[pos]
        if type(value) is bool and st[2]:
            keys.append(_component(asc_key(int(value)), desc))
        elif _is_num01(value) and st[1]:
            keys.append(_component(asc_key(bool(value)), desc))
        return keys


def indexable_spec(index_dict):
    key = index_dict.get("key") or []
    try:
        return all(int(d) in (1, -1) and not isinstance(d, bool) for _, d in key) and bool(key)
    except (TypeError, ValueError):
        return False
