"""Aggregation stages the embedded store runs itself.

mongomock runs every stage by itself, sorting documents with BSON
comparisons and deep-copying them; for the stages `/stats` relies on, these
run the same stage in linear time on the pipeline's own copies, or answer
None to leave the stage to mongomock.
"""

import datetime

from bson.objectid import ObjectId
from mongomock import aggregate as mm_aggregate


def inclusion_projection(stage):
    """True for `{"$project": {field: 1, ...}}` naming plain fields only,
    which a find projection gives exactly."""
    if stage_name(stage) != "$project":
        return False
    spec = stage["$project"]
    return (
        isinstance(spec, dict)
        and bool(spec)
        and all(isinstance(k, str) and not k.startswith("$") and v in (1, True) for k, v in spec.items())
    )


def _hashable(value):
    """A hashable stand-in for a `$group` key, equal for values MongoDB
    groups together (1 and 1.0 alike, True apart from 1); None for values
    it cannot stand in for."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", "NaN" if value != value else value)  # MongoDB groups NaNs together
    if value is None or isinstance(value, (str, ObjectId, datetime.datetime)):
        return ("value", value)
    if isinstance(value, dict):
        items = tuple((k, _hashable(v)) for k, v in value.items())
        return None if any(v is None for _, v in items) else ("object", items)
    if isinstance(value, list):
        items = tuple(_hashable(v) for v in value)
        return None if any(v is None for v in items) else ("array", items)
    return None


def _group_stage(docs, options):
    """`$group` by hashing each key once. mongomock sorts every document by
    its key with BSON comparisons first, which made most of a `/stats`
    request's time. None (use mongomock's) for keys this cannot hash."""
    if not isinstance(options, dict) or not options.get("_id"):
        return None
    groups = {}
    for doc in docs:
        try:
            key = mm_aggregate._parse_expression(options["_id"], doc, ignore_missing_keys=True)  # pylint: disable=protected-access
        except KeyError:
            key = None
        hashed = _hashable(key)
        if hashed is None:
            return None
        groups.setdefault(hashed, (key, []))[1].append(doc)
    out = []
    for key, members in groups.values():
        row = mm_aggregate._accumulate_group(options, members)  # pylint: disable=protected-access
        row["_id"] = key
        out.append(row)
    return out


def _sort_stage(docs, options):
    """`$sort` on one field whose values are all plain numbers, compared as
    numbers instead of through BSON comparisons. None (use mongomock's)
    otherwise."""
    if not isinstance(options, dict) or len(options) != 1:
        return None
    ((field, direction),) = options.items()
    if not isinstance(field, str) or "." in field or field.startswith("$"):
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
    if not isinstance(options, str) or not options.startswith("$") or "." in options:
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
_FAST_STAGES = {"$group": _group_stage, "$sort": _sort_stage, "$unwind": _unwind_stage}
#: Stages that build new documents and never change their input in place:
#: after `$unwind`'s shallow copies, only these may follow.
_READ_ONLY_STAGES = {"$match", "$project", "$group", "$sort", "$skip", "$limit", "$count"}


def stage_name(stage):
    return next(iter(stage), None) if isinstance(stage, dict) and len(stage) == 1 else None


def fast_stage(pipeline, i):
    """The embedded store's own runner for stage `i`, or None."""
    name = stage_name(pipeline[i])
    if name == "$unwind" and not all(stage_name(s) in _READ_ONLY_STAGES for s in pipeline[i + 1 :]):
        return None
    return _FAST_STAGES.get(name)
