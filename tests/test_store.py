"""The embedded store: pymongo-compatible results, index acceleration equal
to a full scan, atomicity under threads, durability across kill -9."""

import contextlib
import datetime
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import bson
import mongomock
import pymongo
import pytest
from bson.objectid import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, InvalidOperation, OperationFailure
from pymongo.write_concern import WriteConcern

from banyan.server import store as store_mod
from banyan.server.store import EmbeddedClient, EmbeddedCollection, connect
from banyan.store import engine, journal

CLAIM_INDEX = [("state", 1), ("pending_dependency_count", 1), ("priority", -1), ("_created", 1)]
UTC = datetime.timezone.utc


@pytest.fixture
def client(tmp_path):
    c = EmbeddedClient(str(tmp_path / "data"))
    yield c
    c.close()


def _coll(client):
    return client["banyan"]["tasks"]


# --------------------------------------------------------------------------
# Indexed queries give exactly what a full scan gives
# --------------------------------------------------------------------------

STATES = ["available", "running", "done", "held"]
T0 = datetime.datetime(2024, 1, 1, tzinfo=UTC)


def _random_doc(rng, i):
    doc = {
        "_id": ObjectId(),
        "n": i,
        "state": rng.choice(STATES),
        "pending_dependency_count": rng.choice([0, 0, 0, 1, 2, False, 0.0]),
        "_created": T0 + datetime.timedelta(seconds=rng.randrange(50)),
        "requested_resources": {"cores": rng.randrange(1, 5)},
    }
    prio = rng.random()
    if prio < 0.8:
        doc["priority"] = rng.randrange(-2, 3)
    elif prio < 0.88:
        doc["priority"] = rng.choice([1.5, None, "high", True])
    # else: priority missing
    cont = rng.random()
    if cont < 0.6:
        doc["continuations"] = rng.sample(range(12), rng.randrange(0, 4))
    elif cont < 0.75:
        doc["continuations"] = rng.randrange(12)
    if rng.random() < 0.6:
        doc["worker"] = rng.choice(["w1", "w2", "w3"])
    doc["owner"] = rng.choice(["ann", "bob", "cy", None])
    return doc


def _random_filter(rng):
    choice = rng.randrange(13)
    if choice == 11:  # a lower bound on an index's first field: a range of it
        return {"priority": {rng.choice(["$gt", "$gte"]): rng.choice([0, 1, 1.5, True, "a", None])}}
    if choice == 12:  # on a multikey field, and bounds inside an `$and`
        return {
            "$and": [
                {"continuations": {"$gte": rng.randrange(12)}},
                {"n": {"$gt": rng.randrange(300)}},
                {"n": {"$gte": rng.randrange(300)}},
            ]
        }
    if choice == 9:
        return {"owner": {"$nin": ["ann", None]}, "priority": {"$lt": rng.choice(["z", 1, None])}}
    if choice == 10:
        return {"state": {"$ne": "done"}, "n": {"$gte": rng.randrange(300)}, "pending_dependency_count": {"$eq": 0}}
    if choice == 0:
        return {
            "state": rng.choice(STATES),
            "pending_dependency_count": 0,
            "requested_resources.cores": {"$lte": rng.randrange(1, 5)},
        }
    if choice == 1:
        return {"continuations": rng.randrange(12)}
    if choice == 2:
        return {"worker": rng.choice(["w1", "w2", "w3"]), "state": rng.choice(STATES)}
    if choice == 3:
        return {"owner": rng.choice(["ann", "bob", "cy", None])}
    if choice == 4:
        return {"state": {"$in": rng.sample(STATES, 2)}, "priority": {"$gte": 0}}
    if choice == 5:
        return {"$and": [{"state": rng.choice(STATES)}, {"_deleted": {"$ne": True}}]}
    if choice == 6:
        return {"pending_dependency_count": rng.choice([0, 1, False, True])}
    if choice == 7:
        return {"requested_resources.cores": {"$gt": 2}}  # not indexed: full scan
    return {"state": rng.choice(STATES), "pending_dependency_count": {"$in": [0, 1]}}


SORTS = [
    None,
    [("priority", -1), ("_created", 1)],
    [("priority", 1)],
    [("_created", 1), ("n", -1)],
    [("state", 1), ("priority", -1), ("_created", 1)],
]


def _random_update(rng):
    choice = rng.randrange(7)
    if choice == 0:
        return {"$set": {"state": rng.choice(STATES), "worker": rng.choice(["w1", "w2"])}}
    if choice == 1:
        return {"$inc": {"priority": rng.choice([-1, 1])}}
    if choice == 2:
        return {"$push": {"continuations": rng.randrange(12)}}
    if choice == 3:
        return {"$pull": {"continuations": {"$in": [rng.randrange(12), rng.randrange(12)]}}}
    if choice == 4:
        return {"$unset": {"worker": ""}}
    if choice == 5:
        return {"$set": {"pending_dependency_count": rng.choice([0, 1, False])}}
    return {"$addToSet": {"continuations": {"$each": [rng.randrange(12), rng.randrange(12)]}}}


def _run_equivalence(tmp_path, seed, ndocs=250, nops=400):
    rng = random.Random(seed)
    emb = EmbeddedClient(str(tmp_path / ("eq%d" % seed)))
    ref_client = mongomock.MongoClient(tz_aware=True)
    colls = [emb["db"]["tasks"], ref_client["db"]["tasks"]]
    for c in colls:
        c.create_index(CLAIM_INDEX)
        c.create_index([("continuations", 1)])
        c.create_index([("worker", 1), ("state", 1)])
        c.create_index([("owner", 1)])
        c.create_index([("priority", 1)])
        c.create_index([("n", 1)])
    docs = [_random_doc(rng, i) for i in range(ndocs)]
    for c in colls:
        c.insert_many([dict(d) for d in docs])
    next_n = ndocs

    def both(fn):
        out = []
        for c in colls:
            try:
                out.append(("ok", fn(c)))
            except Exception as err:  # compare the failure too
                # mongomock's TypeError is the embedded store's (and MongoDB's) WriteError
                name = type(err).__name__
                out.append(("err", "WriteError" if name in ("TypeError", "AttributeError") else name))
        assert out[0] == out[1], out
        return out[0][1]

    queries = 0
    for step in range(nops):
        if step == nops // 2:  # indexes rebuilt from snapshot + journal must agree too
            emb.close()
            emb = EmbeddedClient(str(tmp_path / ("eq%d" % seed)))
            colls[0] = emb["db"]["tasks"]
        kind = rng.randrange(10)
        flt = _random_filter(rng)
        sort = rng.choice(SORTS)
        if kind <= 2:
            limit = rng.choice([0, 1, 3])
            skip = rng.choice([0, 0, 2])
            both(lambda c: list(c.find(flt, sort=sort, limit=limit, skip=skip)))
            queries += 1
        elif kind == 3:
            both(lambda c: c.find_one(flt, sort=sort))
            both(lambda c: c.count_documents(flt))
            queries += 2
        elif kind == 4:
            upd = _random_update(rng)
            both(
                lambda c: c.find_one_and_update(
                    flt, upd, sort=sort, return_document=rng.choice([ReturnDocument.BEFORE])
                )
            )
        elif kind == 5:
            upd = _random_update(rng)
            both(lambda c: (lambda r: (r.matched_count, r.modified_count))(c.update_one(flt, upd)))
        elif kind == 6:
            upd = _random_update(rng)
            both(lambda c: (lambda r: (r.matched_count, r.modified_count))(c.update_many(flt, upd)))
        elif kind == 7:
            if rng.random() < 0.5:
                both(lambda c: c.delete_one(flt).deleted_count)
            else:
                doc = _random_doc(rng, next_n)
                next_n += 1
                both(lambda c: c.insert_one(dict(doc)).inserted_id)
        elif kind == 8:
            ids = [d["_id"] for d in rng.sample(docs, 3)]
            both(lambda c: list(c.find({"_id": {"$in": ids}}, sort=sort)))
            both(lambda c: c.find_one({"_id": ids[0]}))
            # many ids (decided by a set lookup), some unknown, with another condition
            many = [d["_id"] for d in rng.sample(docs, min(len(docs), 12))] + [ObjectId(), ObjectId()]
            both(
                lambda c: list(
                    c.find({"_id": {"$in": many}, "state": {"$nin": ["cancelled", "terminated"]}}, sort=sort)
                )
            )
            queries += 3
        else:
            doc = _random_doc(rng, next_n)
            next_n += 1
            doc["_id"] = rng.choice(docs)["_id"]
            both(
                lambda c: (lambda r: (r.matched_count, r.upserted_id))(
                    c.replace_one({"_id": doc["_id"]}, {k: v for k, v in doc.items() if k != "_id"}, upsert=True)
                )
            )
    both(lambda c: list(c.find()))
    emb.close()
    return queries


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.slow
def test_indexed_queries_equal_full_scan(tmp_path, seed):
    assert _run_equivalence(tmp_path, seed) > 50


#: Indexes on one field, on a second field, on a dotted field and on an
#: array, for `test_updates_keep_every_index_like_a_full_scan`.
SKIP_INDEXES = [
    [("state", 1), ("n", 1)],
    [("kind", 1), ("flag", 1)],
    [("flag", 1)],
    [("r.cores", 1), ("state", 1)],
    [("tags", 1)],
    [("owner", 1)],
]
FLAGS = [0, 1, True, False, 1.0, 0.0, None, 2]
SKIP_QUERIES = (
    [({"state": s}, [("n", 1)]) for s in STATES]  # in the index's order of `n`
    + [({"state": s, "n": n}, None) for s in STATES for n in (0, 1, 5, 7, 11, 40)]
    + [({"kind": k}, [("flag", d)]) for k in "xy" for d in (1, -1)]  # bools after numbers
    + [({"flag": v}, None) for v in FLAGS]
    + [({"flag": {"$gte": v}}, None) for v in (0.5, 1, True)]
    + [({"r.cores": c}, [("state", 1)]) for c in range(6)]
    + [({"r.cores": {"$gte": 3}}, None)]
    + [({"tags": t}, None) for t in ("a", "b", "c", "solo")]
    + [({"tags": {"$gte": "b"}}, None)]
    + [({"owner": o}, None) for o in ("ann", "bob", None)]
)
#: (filter, update): each changes one field that some of the indexes read.
SKIP_UPDATES = [
    ({"n": 0}, {"$set": {"note": "x"}}),  # a field no index reads
    ({"n": 0}, {"$set": {"state": "done"}}),  # one field of two indexes
    ({"n": 1}, {"$set": {"n": 40}}),  # the second field of an index
    ({"n": 2}, {"$set": {"r.cores": 5}}),  # a dotted field
    ({"n": 3}, {"$set": {"r": {"mem": 1, "cores": 2}}}),  # the document holding it
    ({"n": 3}, {"$unset": {"r": ""}}),  # missing
    ({"n": 4}, {"$set": {"r": [{"cores": 1}, {"cores": 4}]}}),  # through an array
    ({"n": 4}, {"$set": {"r.1.cores": 3}}),
    ({"n": 5}, {"$push": {"tags": "c"}}),  # an array
    ({"n": 5}, {"$pull": {"tags": "a"}}),
    ({"n": 5}, {"$set": {"tags": []}}),  # empty
    ({"n": 5}, {"$set": {"tags": "solo"}}),  # no longer an array
    ({"n": 5}, {"$unset": {"tags": ""}}),
    ({"n": 6}, {"$set": {"flag": True}}),  # 1 -> True -> 1.0 -> 1: equal in Python, not in BSON
    ({"n": 6}, {"$set": {"flag": 1.0}}),
    ({"n": 6}, {"$set": {"flag": 1}}),
    ({"n": 7}, {"$set": {"flag": False}}),  # 0 -> False -> 0.0
    ({"n": 7}, {"$set": {"flag": 0.0}}),
    ({"n": 8}, {"$set": {"owner": "bob", "flag": True}}),  # two fields at once
    ({}, {"$set": {"flag": 1}}),  # many documents
    ({"kind": "x"}, {"$set": {"flag": True}}),
]


def test_updates_keep_every_index_like_a_full_scan(client):
    """An update re-indexes a document only in the indexes that read a field
    it changed (`FieldChanges`): after updates of one field, of a second
    index field, of dotted and array fields, and between `1`, `True` and
    `1.0` (equal in Python, different index keys), every indexed query
    answers what mongomock's full scan does, in its order."""
    ours = _coll(client)
    reference = mongomock.MongoClient(tz_aware=True)["db"]["tasks"]
    for index in SKIP_INDEXES:
        ours.create_index(index)
    docs = [
        {
            "_id": i,
            "n": i,
            "state": STATES[i % 4],
            "kind": "xy"[i % 2],
            "flag": FLAGS[i % len(FLAGS)],
            "r": {"cores": i % 4},
            "tags": [["a"], ["a", "b"], []][i % 3],
            "owner": ["ann", "bob"][i % 2],
        }
        for i in range(12)
    ]
    ours.insert_many([dict(d) for d in docs])
    reference.insert_many([dict(d) for d in docs])
    for flt, update in SKIP_UPDATES:
        for coll in (ours, reference):
            coll.update_many(flt, update)
        for query, sort in SKIP_QUERIES:
            assert list(ours.find(query, sort=sort)) == list(reference.find(query, sort=sort)), (update, query, sort)


def test_claim_query_uses_index_in_order(client):
    coll = _coll(client)
    coll.create_index(CLAIM_INDEX)
    coll.insert_many(
        [
            {
                "state": "available",
                "pending_dependency_count": 0,
                "priority": i % 5,
                "_created": T0 + datetime.timedelta(seconds=i),
                "requested_resources": {"cores": 1 + i % 4},
            }
            for i in range(500)
        ]
    )
    store = coll._store
    plan = store.plan(
        {"state": "available", "pending_dependency_count": 0, "requested_resources.cores": {"$lte": 2}},
        [("priority", -1), ("_created", 1)],
    )
    assert plan is not None and plan[1] is True  # candidates come in sort order
    claimed = coll.find_one_and_update(
        {"state": "available", "pending_dependency_count": 0, "requested_resources.cores": {"$lte": 2}},
        {"$set": {"state": "running"}},
        sort=[("priority", -1), ("_created", 1)],
        return_document=ReturnDocument.AFTER,
    )
    # priority 4 at i=4, 9, 14...; cores 1 + i % 4 <= 2 first holds for i=4 (cores 1)
    assert claimed["priority"] == 4 and claimed["state"] == "running"
    assert claimed["_created"] == T0 + datetime.timedelta(seconds=4)
    assert coll.count_documents({"state": "running"}) == 1
    # A non-indexed filter falls back to a full scan but still works.
    assert store.plan({"requested_resources.cores": 1}, None) is None
    assert coll.count_documents({"requested_resources.cores": 1}) == 125


def test_descending_index_orders_64_bit_and_small_integers(client):
    """A document's 64-bit integer comes back from its stored BSON as Int64:
    a descending index field orders it among plain ints (was a TypeError)."""
    coll = _coll(client)
    coll.create_index(CLAIM_INDEX)
    values = [2**63 - 1, 0, -1, 2**40, -(2**63), 7]
    for i, priority in enumerate(values):
        coll.insert_one(
            {
                "state": "available",
                "pending_dependency_count": 0,
                "priority": priority,
                "_created": T0 + datetime.timedelta(seconds=i),
            }
        )
    found = [
        d["priority"]
        for d in coll.find(
            {"state": "available", "pending_dependency_count": 0}, sort=[("priority", -1), ("_created", 1)]
        )
    ]
    assert found == sorted(values, reverse=True)


# --------------------------------------------------------------------------
# pymongo API and MongoDB update semantics
# --------------------------------------------------------------------------


def test_update_operators_match_mongodb(client):
    coll = _coll(client)
    oid = coll.insert_one(
        {
            "tags": ["a"],
            "n": 1,
            "nested": {"x": 1},
            "history": [{"i": k} for k in range(5)],
            "items": [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}],
        }
    ).inserted_id
    res = coll.update_one(
        {"_id": oid},
        {
            "$set": {"nested.y": 2, "history.3.ended": T0},
            "$inc": {"n": 2},
            "$push": {"log": "started"},
            "$addToSet": {"tags": {"$each": ["a", "b", "c"]}},
        },
    )
    assert (res.matched_count, res.modified_count, res.upserted_id) == (1, 1, None)
    coll.update_one({"_id": oid}, {"$pull": {"tags": {"$in": ["b", "zz"]}}, "$unset": {"nested.x": ""}})
    doc = coll.find_one(oid)
    assert doc["tags"] == ["a", "c"]
    assert doc["n"] == 3
    assert doc["nested"] == {"y": 2}
    assert doc["log"] == ["started"]
    assert doc["history"][3] == {"i": 3, "ended": T0}
    assert doc["history"][2] == {"i": 2}
    assert coll.find_one({"items": {"$elemMatch": {"k": 2, "v": "b"}}})["_id"] == oid
    assert coll.find_one({"items": {"$elemMatch": {"k": 2, "v": "a"}}}) is None
    assert coll.find_one({"items.v": "b"}, {"n": 1, "_id": 0}) == {"n": 3}
    # dates come back tz-aware UTC
    assert doc["history"][3]["ended"].tzinfo is not None
    assert doc["history"][3]["ended"].utcoffset() == datetime.timedelta(0)


def test_results_and_errors_like_pymongo(client):
    coll = _coll(client)
    res = coll.insert_many([{"_id": i, "v": i % 3} for i in range(10)])
    assert res.inserted_ids == list(range(10))
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_id": 3})
    coll.create_index("name", unique=True, sparse=True)
    coll.update_one({"_id": 1}, {"$set": {"name": "x"}})
    with pytest.raises(DuplicateKeyError):
        coll.update_one({"_id": 2}, {"$set": {"name": "x"}})
    assert coll.find_one({"_id": 2}).get("name") is None
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_id": 100, "name": "x"})
    assert coll.find_one({"_id": 100}) is None
    assert coll.update_many({"v": 0}, {"$set": {"w": 1}}).modified_count == 4
    up = coll.update_one({"_id": 50}, {"$set": {"v": 9}}, upsert=True)
    assert (up.matched_count, up.modified_count, up.upserted_id) == (0, 0, 50)
    assert coll.delete_many({"v": 1}).deleted_count == 3
    assert coll.delete_one({"_id": 999}).deleted_count == 0
    assert sorted(coll.distinct("v")) == [0, 2, 9]
    assert [d["_id"] for d in coll.find({}, {"_id": 1}).sort("_id", -1).skip(1).limit(2)] == [9, 8]
    agg = list(
        coll.aggregate(
            [{"$match": {"v": {"$in": [0, 2]}}}, {"$group": {"_id": "$v", "c": {"$sum": 1}}}, {"$sort": {"_id": 1}}]
        )
    )
    assert agg == [{"_id": 0, "c": 4}, {"_id": 2, "c": 3}]
    bulk = coll.bulk_write(
        [
            pymongo.InsertOne({"_id": 60}),
            pymongo.UpdateOne({"_id": 60}, {"$set": {"v": 1}}),
            pymongo.DeleteOne({"_id": 0}),
        ]
    )
    assert (bulk.inserted_count, bulk.modified_count, bulk.deleted_count) == (1, 1, 1)
    before = coll.find_one_and_update({"_id": 60}, {"$inc": {"v": 1}}, projection={"v": 1})
    assert before == {"_id": 60, "v": 1}
    after = coll.find_one_and_update({"_id": 61}, {"$set": {"v": 5}}, upsert=True, return_document=ReturnDocument.AFTER)
    assert after == {"_id": 61, "v": 5}
    assert coll.find_one_and_delete({"_id": 61}) == {"_id": 61, "v": 5}
    assert coll.index_information()["name_1"]["unique"] is True
    assert [ix["name"] for ix in coll.list_indexes()] == ["_id_", "name_1"]
    coll.drop_index("name_1")
    assert "name_1" not in coll.index_information()
    wc = coll.with_options(write_concern=WriteConcern(w=1, j=True))
    assert isinstance(wc, EmbeddedCollection)
    wc.insert_one({"_id": 70})
    assert coll.find_one({"_id": 70}) == {"_id": 70}
    with pytest.raises(OperationFailure):
        coll.create_index("v", name="v_1", unique=True)
        coll.create_index("v", name="v_1")  # same name, different options
    assert client.get_database().name == "banyan"


AGGREGATE_DOCS = [
    {"_id": 1, "k": 1, "n": 3, "tags": ["a", "b"], "h": [{"s": 1, "e": 4}, {"s": 2, "e": None}], "r": {"x": 0}},
    {"_id": 2, "k": 1.0, "n": 1.5, "tags": [], "h": [{"s": 5, "e": 9}]},
    {"_id": 3, "k": True, "n": -2, "tags": None, "h": []},
    {"_id": 4, "k": "x", "n": 7, "tags": "solo", "h": [{"s": 0, "e": 1}]},
    {"_id": 5, "k": {"a": 1, "b": [1, 2]}, "n": 0, "h": [{"s": 3, "e": 3}]},
    {"_id": 6, "n": 2, "tags": ["c"], "h": [{"s": 1, "e": 2}]},
    {"_id": 7, "k": {"a": 1, "b": [1, 2]}, "n": "text", "tags": ["a"]},
    {"_id": 8, "k": T0, "n": 4, "tags": ["d", "a"], "h": [{"s": 4, "e": 8}], "r": {"x": 0}},
]


@pytest.mark.parametrize(
    "pipeline",
    [
        [{"$group": {"_id": "$k", "c": {"$sum": 1}, "t": {"$sum": "$n"}, "m": {"$max": "$_id"}}}],
        [{"$group": {"_id": {"k": "$k", "even": {"$eq": [{"$mod": ["$_id", 2]}, 0]}}, "c": {"$sum": 1}}}],
        [{"$group": {"_id": None, "c": {"$sum": 1}}}],
        [{"$match": {"n": {"$type": "number"}}}, {"$project": {"n": 1}}, {"$sort": {"n": -1}}],
        [{"$project": {"n": 1}}, {"$sort": {"n": 1}}],  # a string among numbers: mongomock's sort
        [{"$project": {"tags": 1}}, {"$unwind": "$tags"}],
        [
            {"$match": {"h.e": {"$ne": None}}},
            {"$project": {"h": 1}},
            {"$unwind": "$h"},
            {"$match": {"h.e": {"$ne": None}}},
            {"$project": {"_id": 0, "d": {"$subtract": ["$h.e", "$h.s"]}}},
            {"$sort": {"d": 1}},
            {"$skip": 1},
        ],
        [{"$unwind": {"path": "$tags", "preserveNullAndEmptyArrays": True}}],
        # answered from views the writes keep up to date (banyan/store/views.py)
        [{"$match": {}}, {"$project": {"k": 1, "n": 1}}, {"$group": {"_id": "$k", "c": {"$sum": 1}}}],
        [
            {"$match": {"n": {"$type": "number"}}},
            {"$project": {"n": 1}},
            {"$group": {"_id": None, "t": {"$sum": "$n"}}},
        ],
        [
            {"$match": {"h.e": {"$ne": None}}},
            {"$project": {"h": 1}},
            {"$unwind": "$h"},
            {"$match": {"h.e": {"$ne": None}}},
            {"$group": {"_id": "$h.e", "c": {"$sum": 1}}},
        ],
        [
            {"$match": {"h.e": {"$ne": None}}},
            {"$project": {"h": 1}},
            {"$unwind": "$h"},
            {"$match": {"h.e": {"$ne": None}}},
            {"$sort": {"h.e": 1}},
            {"$skip": 1},
            {"$limit": 3},
            {"$project": {"h.e": 1}},
        ],
        [
            {"$match": {"h.e": {"$ne": None}}},
            {"$project": {"h": 1}},
            {"$unwind": "$h"},
            {"$sort": {"h.s": -1}},
            {"$limit": 2},
            {"$project": {"h.s": 1}},
        ],
        [{"$match": {}}, {"$project": {"n": 1}}, {"$sort": {"n": -1}}, {"$skip": 2}, {"$limit": 4}],
        [
            {"$match": {}},
            {"$project": {"tags": 1, "r.x": 1}},
            {"$unwind": {"path": "$tags", "preserveNullAndEmptyArrays": True}},
            {"$group": {"_id": {"t": "$tags", "x": "$r.x"}, "c": {"$sum": 1}}},
        ],
        [
            {"$match": {}},
            {"$project": {"h": 1}},
            {"$unwind": "$h"},
            {"$sort": {"h.s": -1}},
            {"$skip": 3},
            {"$limit": 4},
        ],  # ties, in store order either way
        [{"$match": {}}, {"$project": {"h": 1}}, {"$unwind": "$h"}, {"$sort": {"h.s": 1}}, {"$skip": 1}, {"$limit": 4}],
        # a stage that changes documents in place after `$unwind`: no shared parts
        [
            {"$match": {"h.0": {"$exists": True}}},
            {"$unwind": "$h"},
            {"$addFields": {"r.s": "$h.s"}},
            {"$project": {"r": 1}},
        ],
    ],
)
def test_aggregate_equals_mongomock(client, pipeline):
    """The embedded store runs some stages itself (`$group` by hashed key,
    `$sort` of plain numbers, `$unwind` with shallow copies) and keeps the
    rows of a pipeline's leading per-document stages until their document
    changes; the answers are mongomock's, after every kind of change, up to
    the order of `$group`'s output, which MongoDB does not define either."""
    coll = _coll(client)
    coll.insert_many([dict(d) for d in AGGREGATE_DOCS])
    reference = mongomock.MongoClient(tz_aware=True)["db"]["c"]
    reference.insert_many([dict(d) for d in AGGREGATE_DOCS])

    def same():
        ours, theirs = list(coll.aggregate(pipeline)), list(reference.aggregate(pipeline))
        if "$group" in pipeline[-1]:
            key = lambda row: repr(row["_id"])  # noqa: E731
            ours, theirs = sorted(ours, key=key), sorted(theirs, key=key)
        assert ours == theirs
        return ours

    assert same()
    for row in coll.aggregate(pipeline):  # what a caller does with its rows stays its own
        row.clear()
    same()
    for c in (coll, reference):
        c.update_one({"_id": 1}, {"$set": {"n": 11, "h.0.e": 7}, "$push": {"tags": "z"}})
        c.replace_one({"_id": 2}, {"k": 2, "n": 8, "h": [{"s": 1, "e": 2}], "tags": ["y"]})
        c.delete_one({"_id": 4})
        c.insert_one({"_id": 9, "k": 1, "n": 5, "tags": ["a"], "h": [{"s": 6, "e": 9}]})
    same()
    for c in (coll, reference):
        c.update_one({"_id": 3}, {"$set": {"unread": [1, 2]}})  # no field a view reads: its rows stay
        c.update_one({"_id": 9}, {"$set": {"k": True, "n": 5.0}})  # equal in Python (1 == True), not in BSON
        c.update_one({"_id": 6}, {"$unset": {"tags": ""}, "$set": {"h.0.e": None}})
        c.update_one({"_id": 8}, {"$set": {"r": {"x": 0}, "h": [{"s": 4, "e": 8}]}})  # the same values again
    same()


@pytest.mark.parametrize(
    "update,error",
    [
        ({"$set": {"state": "X"}, "$inc": {"s": 1}}, pymongo.errors.WriteError),
        ({"$set": {"state": "X"}, "$push": {"s": 1}}, pymongo.errors.WriteError),
        ({"$set": {"state": "X", "h.0.usage": {"a\x00": 1}}}, bson.errors.InvalidDocument),
    ],
)
def test_a_failed_update_changes_nothing(tmp_path, update, error):
    """MongoDB changes a document all or not at all; mongomock applies
    operators one by one. Nothing of a failed update stays, in memory or
    in the journal."""
    c = EmbeddedClient(str(tmp_path / "data"))
    coll = _coll(c)
    coll.create_index("state")
    doc = {"_id": 1, "state": "running", "s": "text", "h": [{}]}
    coll.insert_one(dict(doc))
    with pytest.raises(error):
        coll.update_one({"_id": 1}, update)
    assert coll.find_one({"_id": 1}) == doc
    assert coll.count_documents({"state": "X"}) == 0 and coll.count_documents({"state": "running"}) == 1
    c.close()
    c = EmbeddedClient(str(tmp_path / "data"))
    assert _coll(c).find_one({"_id": 1}) == doc
    c.close()


def test_connect_chooses_store(tmp_path):
    mongo = connect(mongo_uri="mongodb://127.0.0.1:1/banyan")
    try:
        assert isinstance(mongo, pymongo.MongoClient)
        assert mongo.codec_options.tz_aware is True
    finally:
        mongo.close()
    emb = connect(data_dir=str(tmp_path / "d"))
    try:
        assert isinstance(emb, EmbeddedClient)
        with pytest.raises(RuntimeError):
            EmbeddedClient(str(tmp_path / "d"))  # one process per data dir
    finally:
        emb.close()
    with pytest.raises(InvalidOperation):
        emb["banyan"]["t"].insert_one({})


# --------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------


def test_reopen_restores_documents_and_indexes(tmp_path):
    path = str(tmp_path / "data")
    c = EmbeddedClient(path)
    coll = _coll(c)
    coll.create_index(CLAIM_INDEX)
    coll.create_index("name", unique=True)
    ids = coll.insert_many(
        [
            {
                "name": "t%d" % i,
                "state": "available",
                "priority": i,
                "pending_dependency_count": 0,
                "_created": T0,
                "big": 2**40,
                "f": 0.5,
            }
            for i in range(50)
        ]
    ).inserted_ids
    coll.update_one({"_id": ids[3]}, {"$set": {"state": "running"}})
    coll.delete_one({"_id": ids[4]})
    c["other"]["empty"].create_index("x")
    c.close()

    c = EmbeddedClient(path)
    coll = _coll(c)
    assert coll.count_documents({}) == 49
    assert coll.find_one({"_id": ids[3]})["state"] == "running"
    assert coll.find_one({"_id": ids[4]}) is None
    doc = coll.find_one({"_id": ids[5]})
    assert doc["_created"] == T0 and doc["big"] == 2**40 and doc["f"] == 0.5
    assert set(coll.index_information()) == {
        "_id_",
        "name_1",
        "state_1_pending_dependency_count_1_priority_-1__created_1",
    }
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"name": "t7"})
    claimed = coll.find_one_and_update(
        {"state": "available", "pending_dependency_count": 0},
        {"$set": {"state": "running"}},
        sort=[("priority", -1), ("_created", 1)],
    )
    assert claimed["priority"] == 49
    assert "x_1" in c["other"]["empty"].index_information()
    c.close()


def test_torn_journal_tail_is_ignored(tmp_path):
    path = str(tmp_path / "data")
    c = EmbeddedClient(path)
    coll = _coll(c)
    coll.insert_one({"_id": "a", "v": 1})
    c.close()
    c = EmbeddedClient(path)  # "a" is now in the snapshot, journal empty
    _coll(c).insert_one({"_id": "b", "v": 2})
    _coll(c).update_one({"_id": "a"}, {"$set": {"v": 10}})
    c.close()
    journal_path = os.path.join(path, journal.JOURNAL)
    frame = journal.frame([{"o": "p", "d": "banyan", "c": "tasks", "docs": [{"_id": "c"}]}])
    with open(journal_path, "ab") as f:
        f.write(frame[: len(frame) // 2])  # a half-written record, as after a crash
    c = EmbeddedClient(path)
    coll = _coll(c)
    assert coll.find_one({"_id": "a"}) == {"_id": "a", "v": 10}
    assert coll.find_one({"_id": "b"}) == {"_id": "b", "v": 2}
    assert coll.find_one({"_id": "c"}) is None
    coll.insert_one({"_id": "d"})
    c.close()
    with open(journal_path, "ab") as f:
        f.write(b"\x00garbage that is not a record")
    c = EmbeddedClient(path)
    assert sorted(d["_id"] for d in _coll(c).find()) == ["a", "b", "d"]
    c.close()


def test_journal_compacts_past_limit(tmp_path):
    path = str(tmp_path / "data")
    c = EmbeddedClient(path, compact_bytes=20000)
    coll = _coll(c)
    for i in range(300):
        coll.insert_one({"_id": i, "pad": "x" * 200})
    coll.delete_many({"_id": {"$lt": 100}})
    assert os.path.getsize(os.path.join(path, journal.JOURNAL)) <= 20000 + 1000
    c.close()
    c = EmbeddedClient(path)
    assert c["banyan"]["tasks"].count_documents({}) == 200
    assert c["banyan"]["tasks"].find_one({"_id": 299})["pad"] == "x" * 200
    c.close()


WRITER = textwrap.dedent("""
    import contextlib, sys, datetime
    from banyan.server.store import EmbeddedClient, one_sync
    c = EmbeddedClient(sys.argv[1])
    # "batched": each pair of writes shares one sync, as a request's writes do
    batch = (lambda: one_sync(c)) if sys.argv[2:] == ["batched"] else contextlib.nullcontext
    coll = c["banyan"]["tasks"]
    coll.create_index([("state", 1)])
    i = 0
    while True:
        doc = {"n": i, "state": "available", "payload": "p" * (i % 50),
               "at": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)}
        with batch():
            _id = coll.insert_one(doc).inserted_id
            coll.update_one({"_id": _id}, {"$set": {"state": "done", "done_n": i}})
        print(_id, flush=True)
        i += 1
""")


@pytest.mark.parametrize("mode", ["per-write", "batched"])
@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill(tmp_path, mode):
    path = str(tmp_path / "data")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), path, mode], stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:
            acked.append(line.strip())
            if len(acked) >= 300:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        acked.extend(line.strip() for line in proc.stdout if line.strip())
    assert len(acked) >= 300
    c = EmbeddedClient(path)
    coll = _coll(c)
    for oid in acked:
        doc = coll.find_one({"_id": ObjectId(oid)})
        assert doc is not None, oid
        assert doc["state"] == "done" and doc["done_n"] == doc["n"]
        assert doc["payload"] == "p" * (doc["n"] % 50)
        assert doc["at"] == datetime.datetime(2024, 1, 1, tzinfo=UTC)
    assert "state_1" in coll.index_information()
    c.close()


# --------------------------------------------------------------------------
# Atomicity under threads
# --------------------------------------------------------------------------


def test_writes_in_one_sync_share_one_fdatasync(tmp_path, monkeypatch):
    c = EmbeddedClient(str(tmp_path / "data"))
    syncs = []
    real = engine._fdatasync
    monkeypatch.setattr(engine, "_fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    coll = _coll(c)
    with store_mod.one_sync(c):
        with store_mod.one_sync(c):  # nested: still one
            for i in range(10):
                coll.insert_one({"_id": i})
        assert syncs == []
    assert len(syncs) == 1
    coll.insert_one({"_id": 10})
    assert len(syncs) == 2
    c.close()
    assert _coll(EmbeddedClient(str(tmp_path / "data"))).count_documents({}) == 11


def test_calls_of_a_thread_marked_first_go_ahead_of_waiting_ones(client):
    """`banyan server` runs its users' requests in `first()`: when the lock
    is released, a user's waiting call goes before a worker's waiting one."""
    engine = client._engine
    engine.urgent_longest = 60  # the order, not the bound, is what is checked here
    coll = client.db.c
    coll.insert_one({"_id": 1, "order": []})
    order = []

    def call(name, first):
        with engine.first() if first else contextlib.nullcontext():
            coll.update_one({"_id": 1}, {"$push": {"order": name}})
        order.append(name)

    with engine.op():  # the lock held while both line up
        worker = threading.Thread(target=call, args=("worker", False))
        worker.start()
        deadline = time.monotonic() + 10
        while engine.waiters < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        user = threading.Thread(target=call, args=("user", True))
        user.start()
        while engine.urgent_waiters < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    worker.join(10)
    user.join(10)
    assert coll.find_one({"_id": 1})["order"] == ["user", "worker"]
    # outside `first`, no precedence is asked for
    assert not getattr(engine.urgent, "on", False)


def test_concurrent_claims_are_exclusive(client):
    coll = _coll(client)
    coll.create_index([("state", 1)])
    coll.insert_many([{"_id": i, "state": "available"} for i in range(2000)])
    claimed = {i: [] for i in range(8)}

    def worker(wid):
        while True:
            doc = coll.find_one_and_update({"state": "available"}, {"$set": {"state": "running", "worker": wid}})
            if doc is None:
                return
            claimed[wid].append(doc["_id"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for ids in claimed.values() for i in ids]
    assert sorted(all_ids) == list(range(2000))
    for wid, ids in claimed.items():
        for i in ids[:20]:
            assert coll.find_one({"_id": i})["worker"] == wid
    assert coll.count_documents({"state": "running"}) == 2000
    assert coll.find_one({"state": "available"}) is None


def test_an_untested_mongomock_is_refused(tmp_path, monkeypatch):
    from banyan.store import adapter

    adapter.check_mongomock("4.3.0")
    monkeypatch.setattr(mongomock, "__version__", "4.4.1")
    with pytest.raises(RuntimeError, match=r"tested with mongomock >=4\.3,<4\.4, and mongomock 4\.4\.1 is installed"):
        EmbeddedClient(str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "data")  # refused before touching anything
