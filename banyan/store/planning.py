"""Query planning helpers: the equalities an index can serve, cheap
rejections before mongomock's own filter, and mongomock's sort.

Every candidate a plan yields is still checked with mongomock's filter, so
results are exactly those of a full scan.
"""

import datetime
import operator

from bson import ObjectId
from mongomock import filtering, helpers
from mongomock.filtering import NOTHING, filter_applies


def store_key(doc_id):
    return helpers.hashdict(doc_id) if isinstance(doc_id, dict) else doc_id


def _eq_scalar(v):
    return not isinstance(v, (dict, list, tuple) + filtering._RE_TYPES)  # pylint: disable=protected-access


def eq_conditions(spec, out):
    """Collect field -> candidate values from top-level equalities / $in
    (and those inside a top-level $and).  Each is a necessary condition."""
    if not isinstance(spec, dict):
        return out
    for k, v in spec.items():
        if k == "$and" and isinstance(v, list):
            for sub in v:
                eq_conditions(sub, out)
            continue
        if not isinstance(k, str) or k.startswith("$"):
            continue
        vals = None
        if isinstance(v, dict):
            if v and all(isinstance(o, str) and o.startswith("$") for o in v):
                if "$eq" in v and _eq_scalar(v["$eq"]):
                    vals = [v["$eq"]]
                elif "$in" in v and isinstance(v["$in"], (list, tuple)) and all(_eq_scalar(x) for x in v["$in"]):
                    vals = list(v["$in"])
        elif _eq_scalar(v):
            vals = [v]
        if vals is not None and (k not in out or len(vals) < len(out[k])):
            out[k] = vals
    return out


def lower_bounds(spec, out):
    """Collect field -> values a top-level `$gt` / `$gte` (or one inside a
    top-level `$and`) puts below it, for plain dates, numbers and strings.
    Each is a necessary condition: MongoDB compares only values of the same
    type (type bracketing), so a matching value sorts above it in an index."""
    if not isinstance(spec, dict):
        return out
    for k, v in spec.items():
        if k == "$and" and isinstance(v, list):
            for sub in v:
                lower_bounds(sub, out)
            continue
        if not isinstance(k, str) or k.startswith("$") or not isinstance(v, dict):
            continue
        for op in ("$gt", "$gte"):
            bound = v.get(op)
            if (
                isinstance(bound, (datetime.datetime, int, float, str))
                and not isinstance(bound, bool)
                and bound == bound
            ):
                out.setdefault(k, []).append(bound)
    return out


_CMP_OPS = {"$lt": operator.lt, "$lte": operator.le, "$gt": operator.gt, "$gte": operator.ge}


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
        if k == "$and" and isinstance(cond, list):
            for sub in cond:
                _compile_rejects(sub, out)
            continue
        if not isinstance(k, str) or k.startswith("$"):
            continue
        parts = k.split(".")
        if isinstance(cond, dict):
            if not cond or not all(isinstance(o, str) and o.startswith("$") for o in cond):
                continue
            for o, sv in cond.items():
                if o in ("$eq", "$ne"):
                    if _eq_scalar(sv):
                        out.append((parts, o, sv))
                elif o in ("$in", "$nin"):
                    if isinstance(sv, (list, tuple)) and all(_eq_scalar(x) for x in sv):
                        out.append((parts, o, sv))
                elif o in _CMP_OPS:
                    try:
                        rank = filtering._get_compare_type(sv)  # pylint: disable=protected-access
                    except NotImplementedError:
                        continue
                    out.append((parts, _CMP_OPS[o], (rank, sv)))
        elif _eq_scalar(cond):
            out.append((parts, "$eq", cond))
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
        if op == "$eq":
            if not v == sv:
                return True
        elif op == "$ne":
            if v == sv:
                return True
        elif op == "$in":
            if v not in sv:
                return True
        elif op == "$nin":
            if v in sv:
                return True
        else:
            sv_rank, operand = sv
            if sv_rank != rank or not op(v, operand):
                return True
    return False


def matcher(spec):
    """filter_applies(spec, doc), with a fast rejection pre-check.

    `{"_id": {"$in": [ObjectIds]}}` is decided by a set lookup: mongomock
    compares each document with every listed id, and asking about 2,000
    tasks by id cost 4 million comparisons. An ObjectId equals nothing but
    an equal ObjectId, so for a document whose `_id` is one the lookup is
    exact; any other document goes to mongomock's filter."""
    cond = spec.get("_id") if isinstance(spec, dict) else None
    if (
        isinstance(cond, dict)
        and list(cond) == ["$in"]
        and isinstance(cond["$in"], (list, tuple))
        and len(cond["$in"]) > 8
        and all(type(v) is ObjectId for v in cond["$in"])
    ):  # pylint: disable=unidiomatic-typecheck
        ids = frozenset(cond["$in"])
        rest = matcher({k: v for k, v in spec.items() if k != "_id"})

        def match(doc):
            doc_id = doc.get("_id")
            if type(doc_id) is ObjectId:  # pylint: disable=unidiomatic-typecheck
                return doc_id in ids and rest(doc)
            return filter_applies(spec, doc)

        return match
    checks = _compile_rejects(spec, [])
    if not checks:
        return lambda doc: filter_applies(spec, doc)
    filter_applies(spec, {})  # surface malformed filters even if all are rejected
    return lambda doc: not _rejected(checks, doc) and filter_applies(spec, doc)


def norm_sort(sort):
    if not sort:
        return []
    if isinstance(sort, dict):
        sort = sort.items()
    try:
        return [(k, d) for k, d in sort]
    except (TypeError, ValueError):
        return None


def mongomock_sort(dataset, sort):
    """mongomock's own sort (stable, applied key by key from the last)."""
    if isinstance(sort, dict):
        sort = sort.items()
    for sort_key, sort_direction in reversed(list(sort)):
        if sort_key == "$natural":
            if sort_direction < 0:
                dataset = iter(reversed(list(dataset)))
            continue
        if sort_key.startswith("$"):
            raise NotImplementedError(f"Sorting by {sort_key} is not implemented in mongomock yet")
        dataset = iter(
            sorted(dataset, key=lambda x, k=sort_key: filtering.resolve_sort_key(k, x), reverse=sort_direction < 0)
        )
    return dataset
