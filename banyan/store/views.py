"""Aggregations kept up to date on every write.

A pipeline that starts with stages acting on each document alone (a
`$match`, an inclusion `$project`, then `$unwind`, `$match`...) and ends in
a `$group` with one `$sum`, or in a `$sort` on one field with a `$limit`,
is answered by a view: built once from every document, then changed by each
write, from the rows the per-document stages give the document before and
after it (`/stats` asks the same few pipelines again and again: a count per
state, the sums and ranks of runtimes). Reading a view costs the size of
its answer, not of the collection.
"""

import copy
from fractions import Fraction

import bson
from mongomock import aggregate as mm_aggregate
from sortedcontainers import SortedList

from banyan.store.aggregation import _hashable, stage_name
from banyan.store.indexes import _shared, in_slices, joined, sorted_list


class Unsupported(Exception):
    """A row a view cannot keep (a group key it cannot hash): the view is
    dropped and the pipeline runs as usual."""


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class GroupView:
    """`{"$group": {"_id": K, name: {"$sum": X}}}` over the rows."""

    def __init__(self, group):
        self.key = group["_id"]
        ((self.name, acc),) = ((k, v) for k, v in group.items() if k != "_id")
        self.summed = acc["$sum"]
        self.groups = {}  # hashed key -> [key, exact total, rows, float rows]
        self.seen = -1  # the documents up to this sequence number are counted in

    @staticmethod
    def fits(tail):
        if len(tail) != 1 or stage_name(tail[0]) != "$group":
            return False
        group = tail[0]["$group"]
        if not isinstance(group, dict) or len(group) != 2 or "_id" not in group:
            return False
        ((name, acc),) = ((k, v) for k, v in group.items() if k != "_id")
        if not isinstance(acc, dict) or list(acc) != ["$sum"]:
            return False
        summed = acc["$sum"]
        return _number(summed) or (isinstance(summed, str) and summed.startswith("$") and "$" not in summed[1:])

    def change(self, rows, sign, seq):
        for row in rows:
            try:
                key = mm_aggregate._parse_expression(self.key, row, ignore_missing_keys=True)  # pylint: disable=protected-access
            except KeyError:
                key = None
            hashed = _hashable(key)
            if hashed is None:
                raise Unsupported(key)
            if _number(self.summed):
                value = self.summed
            else:
                try:
                    value = mm_aggregate._parse_expression(self.summed, row, ignore_missing_keys=True)  # pylint: disable=protected-access
                except KeyError:
                    value = None
                if not _number(value) or value != value:
                    value = 0
            group = self.groups.get(hashed)
            if group is None:
                group = self.groups[hashed] = [key, 0, 0, 0]
            is_float = isinstance(value, float)
            group[1] += sign * (Fraction(value) if is_float else value)
            group[2] += sign
            group[3] += sign * is_float
            if not group[2]:
                del self.groups[hashed]

    def frozen(self):
        """A copy that later writes do not change (`SecondaryIndex.frozen`)."""
        return copy.deepcopy(self)

    def answer(self):
        out = []
        for key, total, _, floats in self.groups.values():
            out.append({"_id": key, self.name: float(total) if floats else int(total)})
        return out


class SortView:
    """`{"$sort": {field: 1 or -1}}, [{"$skip": n}], {"$limit": n}, ...`
    over the rows: every row's sort key in ascending order, with its
    document and its place among the document's rows, so that only the
    rows of the window are computed again when asked. Ties keep the rows'
    store order, as a stable sort does, in either direction (one view
    serves both)."""

    def __init__(self, field, sort_key):
        self.field = field
        self.sort_key = sort_key
        self.entries = SortedList()
        self.seen = -1

    def __getstate__(self):
        """As a snapshot keeps it (`banyan.store.state`): entries in order."""
        return {
            "field": self.field,
            "sort_key": self.sort_key,
            "entries": in_slices(list(self.entries)),
            "seen": self.seen,
        }

    def __setstate__(self, state):
        self.__init__(state["field"], state["sort_key"])
        self.entries = sorted_list(joined(state["entries"]))
        self.seen = state["seen"]

    def frozen(self):
        """A copy that later writes do not change (`SecondaryIndex.frozen`):
        the entries as a list, which is all `__getstate__` reads."""
        out = SortView.__new__(SortView)
        out.field, out.sort_key, out.seen = self.field, self.sort_key, self.seen
        out.entries = list(self.entries)
        return out

    @staticmethod
    def fits(tail):
        if not tail or stage_name(tail[0]) != "$sort":
            return None
        spec = tail[0]["$sort"]
        if not isinstance(spec, dict) or len(spec) != 1:
            return None
        ((field, direction),) = spec.items()
        if not isinstance(field, str) or field.startswith("$") or direction not in (1, -1):
            return None
        i, skip = 1, 0
        if i < len(tail) and stage_name(tail[i]) == "$skip":
            skip = tail[i]["$skip"]
            i += 1
        if i >= len(tail) or stage_name(tail[i]) != "$limit":
            return None
        limit = tail[i]["$limit"]
        if not (isinstance(skip, int) and isinstance(limit, int)) or skip < 0 or limit <= 0:
            return None
        return field, direction, skip, limit, i + 1

    def change(self, rows, sign, seq):
        for i, row in enumerate(rows):
            entry = (_shared(self.sort_key(self.field, row)), seq, i)
            if sign > 0:
                self.entries.add(entry)
            else:
                self.entries.discard(entry)

    def window(self, skip, limit, desc):
        """(seq, row index) of the rows `skip` to `skip + limit` in order."""
        entries = self.entries
        if not desc:
            return [(seq, i) for _, seq, i in entries.islice(skip, skip + limit)]
        out = []
        hi = len(entries)
        while hi and len(out) < limit:  # groups of equal keys from the top, each in store order
            lo = entries.bisect_left((entries[hi - 1][0],))
            size = hi - lo
            if skip >= size:
                skip -= size
            else:
                out.extend((seq, i) for _, seq, i in entries.islice(lo + skip, min(hi, lo + skip + limit - len(out))))
                skip = 0
            hi = lo
        return out


#: Operators of a `$match` whose fields are the fields of their clauses.
_LOGICAL = ("$and", "$or", "$nor")


def fields_read(prefix):
    """The top-level fields the per-document stages `prefix` (a view set's
    key: the encoded stages, a `$match` then an inclusion `$project`) read,
    or None when that cannot be told (an operator such as `$expr` at the
    top of the `$match`). The stages after the `$project` see only what it
    keeps, so a document's rows depend on these fields alone."""
    stages = bson.decode(prefix)["p"]
    fields = _match_fields(stages[0]["$match"])
    if fields is None:
        return None
    return frozenset(fields | {field.split(".")[0] for field in stages[1]["$project"]})


def _match_fields(spec):
    fields = set()
    for key, value in spec.items():
        if key in _LOGICAL and isinstance(value, list):
            for clause in value:
                inner = _match_fields(clause) if isinstance(clause, dict) else None
                if inner is None:
                    return None
                fields |= inner
        elif key.startswith("$"):
            return None
        else:
            fields.add(key.split(".")[0])
    return fields


class ViewSet:
    """The views over the rows of one run of per-document stages
    (`rows_of(doc)`): a write computes a document's rows once for all of
    them. Each view counts the documents up to its `seen` sequence number
    (all, once built). `reads`: the fields the rows come from
    (`fields_read`), or None when unknown."""

    def __init__(self, rows_of, reads=None):
        self.rows_of = rows_of
        self.reads = reads
        self.views = {}

    def unchanged(self, changes):
        """True when an update (`changes`, a `FieldChanges`) leaves the rows
        as they were: it changed none of the fields they come from (a
        fan-in's sink changes its list of parents 500 times, never its state)."""
        return self.reads is not None and not changes.any_of(self.reads)

    def replace(self, changes, seq):
        """A document updated (`changes`: from `changes.before` to
        `changes.after`): its rows change, unless the update left them as
        they were; False as `change`."""
        return self.unchanged(changes) or (self.change(changes.before, -1, seq) and self.change(changes.after, 1, seq))

    @staticmethod
    def built(view):
        return view.seen == float("inf")

    def change(self, doc, sign, seq):
        """Add (sign 1) or take away (-1) a document's rows; False if a
        view cannot keep them (the caller drops the set)."""
        rows = None
        try:
            for view in self.views.values():
                if seq <= view.seen:
                    if rows is None:
                        rows = self.rows_of(doc)
                    view.change(rows, sign, seq)
        except Exception:  # pylint: disable=broad-except  # any failure: the pipeline runs as usual
            return False
        return True

    def add_to(self, view, doc, seq):
        try:
            view.change(self.rows_of(doc), 1, seq)
        except Exception:  # pylint: disable=broad-except
            return False
        return True
