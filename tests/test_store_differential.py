"""The embedded store answers like a real MongoDB-protocol server.

The same documents, indexes, queries, updates and pipelines go to an
EmbeddedClient and to the server at BANYAN_TEST_MONGO_URI (FerretDB in CI),
and the answers must be equal. Sorts end with `_id` so that the order of
ties, which MongoDB leaves open, is fixed. Skipped without a server.
"""

import datetime
import random
import uuid

import pymongo
import pytest
from bson import ObjectId
from conftest import MONGO_URI
from pymongo import ReturnDocument

from banyan.server.store import EmbeddedClient

pytestmark = pytest.mark.skipif(not MONGO_URI, reason="needs BANYAN_TEST_MONGO_URI (a MongoDB-protocol server)")

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
STATES = ["inactive", "available", "running", "terminated", "cancelled"]


def _task(rng, i):
    doc = {
        "_id": ObjectId(),
        "n": i,
        "state": rng.choice(STATES),
        "priority": rng.randrange(-3, 4),
        "owner": rng.choice(["ann", "bob", "cyd"]),
        "_created": T0 + datetime.timedelta(seconds=rng.randrange(100)),
        "requested_resources": {
            "cores": rng.choice([0.5, 1, 2, 4]),
            "memory": rng.choice([0, 1 << 20, 1 << 30]),
            "gpus": rng.choice([0, 0, 1]),
        },
        "continuations": [ObjectId() for _ in range(rng.randrange(3))],
        "pending_dependency_count": rng.choice([0, 0, 1, 2]),
    }
    if rng.random() < 0.5:
        doc["history"] = [
            {
                "worker": rng.choice(["w1", "w2"]),
                "exit_status": rng.choice(["success", "failure"]),
                "runtime": float(rng.randrange(1, 500)),
                "ended": T0 + datetime.timedelta(minutes=rng.randrange(60)),
            }
            for _ in range(rng.randrange(1, 3))
        ]
        doc["exit_status"] = doc["history"][-1]["exit_status"]
    if rng.random() < 0.3:
        doc["name"] = "job-%d" % rng.randrange(10)
    if rng.random() < 0.2:
        doc["queue_wait"] = rng.choice([None, 1.5, 30.0])
    return doc


FILTERS = [
    {},
    {"state": "available"},
    {"state": {"$in": ["available", "running"]}, "pending_dependency_count": 0},
    {"state": {"$nin": ["cancelled", "terminated"]}},
    {"state": {"$ne": "running"}, "priority": {"$gte": 1}},
    {"priority": {"$gt": -2, "$lt": 2}},
    {"name": {"$exists": True}},
    {"name": {"$exists": False}},
    {"queue_wait": None},
    {"queue_wait": {"$ne": None}},
    {"history.exit_status": "failure"},
    {"history.runtime": {"$gte": 250.0}},
    {"history.0": {"$exists": True}},
    {"requested_resources.cores": {"$lte": 1}, "requested_resources.gpus": 0},
    {"$or": [{"owner": "ann"}, {"priority": 3}]},
    {"$and": [{"owner": {"$ne": "bob"}}, {"state": {"$in": ["inactive", "available"]}}]},
    {"_created": {"$gte": T0 + datetime.timedelta(seconds=50)}},
    {"history.ended": {"$gte": T0 + datetime.timedelta(minutes=30)}},
    {"continuations": {"$size": 0}},
]

#: Not on array fields: mongomock (so the embedded store) sorts an array by
#: its first element, MongoDB by its smallest (largest when descending).
SORTS = [
    None,
    [("priority", -1), ("_created", 1)],
    [("state", 1)],
    [("name", -1)],
    [("requested_resources.memory", 1)],
    [("queue_wait", -1)],
]


def _pair(data_dir):
    """(embedded collection, server collection) holding the same 400 tasks."""
    rng = random.Random(20)
    docs = [_task(rng, i) for i in range(400)]
    embedded = EmbeddedClient(str(data_dir))
    server = pymongo.MongoClient(MONGO_URI, tz_aware=True)
    dbname = "banyan_diff_%s" % uuid.uuid4().hex[:10]
    pair = (embedded["banyan"]["tasks"], server[dbname]["tasks"])
    for coll in pair:
        coll.create_index([("state", 1), ("pending_dependency_count", 1), ("priority", -1), ("_created", 1)])
        coll.create_index("continuations")
        coll.create_index("history.ended")
        coll.insert_many([dict(d) for d in docs])
    yield pair
    embedded.close()
    server.drop_database(dbname)
    server.close()


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """A pair for the tests that only read (made once)."""
    yield from _pair(tmp_path_factory.mktemp("differential"))


@pytest.fixture
def both(tmp_path):
    """A pair of its own, for a test that writes."""
    yield from _pair(tmp_path / "data")


def _same(pair, call):
    mine, theirs = (call(coll) for coll in pair)
    assert mine == theirs
    return mine


@pytest.mark.parametrize("flt", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_finds_and_counts(readonly, flt):
    both = readonly
    for sort in SORTS:
        full = (sort or []) + [("_id", 1)]  # the order of ties (and of no sort) is left open
        _same(both, lambda c: list(c.find(flt, sort=full)))
        _same(both, lambda c: list(c.find(flt, {"state": 1, "priority": 1}, sort=full, skip=3, limit=7)))
    _same(both, lambda c: c.count_documents(flt))


UPDATES = [
    ({"state": "available"}, {"$set": {"state": "running", "worker": "w9"}}),
    ({"priority": {"$lt": 0}}, {"$inc": {"priority": 10}}),
    ({"owner": "bob"}, {"$push": {"continuations": "x"}, "$set": {"_etag": "e"}}),
    ({"owner": "cyd"}, {"$addToSet": {"tags": "gpu"}}),
    ({"history.exit_status": "failure"}, {"$unset": {"exit_status": ""}}),
    ({"state": "terminated"}, {"$pull": {"pending_reasons": "held"}, "$set": {"held": False}}),
    ({"history.exit_status": "success"}, {"$set": {"history.0.exit_code": 0}}),
]


#: FerretDB 1.24 (on PostgreSQL) matches nothing in an update whose filter
#: tests a field of documents in an array by equality (`{"history.exit_status":
#: "failure"}`), while its finds match (docs/DATABASES.md). Banyan's server
#: never sends such an update (its update filters name top-level fields,
#: fields of embedded documents and array sizes). On FerretDB 1.x those cases
#: check the embedded store against MongoDB's rule (an update matches what a
#: find matches) and that the gap the docs describe is still there.
FERRETDB_UPDATE_GAP = {i for i, (flt, _) in enumerate(UPDATES) if any(k.startswith("history.") for k in flt)}


def _ferretdb_1(coll):
    version = str(coll.database.client.server_info().get("ferretdbVersion") or "")
    return version.lstrip("v").startswith("1.")


@pytest.mark.parametrize("flt, update", UPDATES, ids=[str(i) for i in range(len(UPDATES))])
def test_updates(both, flt, update):
    if UPDATES.index((flt, update)) in FERRETDB_UPDATE_GAP and _ferretdb_1(both[1]):
        mine, theirs = both
        found = _same(both, lambda c: c.count_documents(flt))
        assert found > 0
        assert mine.update_many(flt, update).matched_count == found
        # Fails once FerretDB matches these: then drop the gap from docs/DATABASES.md and here.
        assert theirs.update_many(flt, update).matched_count == 0
        return
    _same(both, lambda c: c.update_many(flt, update).modified_count)
    _same(both, lambda c: list(c.find({}, sort=[("_id", 1)])))


def test_claims_in_priority_order(both):
    """The claim query: the best available task, taken atomically."""
    for _ in range(30):
        _same(
            both,
            lambda c: c.find_one_and_update(
                {"state": "available", "pending_dependency_count": 0},
                {"$set": {"state": "running"}},
                sort=[("priority", -1), ("_created", 1), ("_id", 1)],
                return_document=ReturnDocument.AFTER,
            ),
        )


PIPELINES = [
    [
        {"$match": {}},
        {"$project": {"state": 1, "exit_status": 1}},
        {"$group": {"_id": {"state": "$state", "exit_status": "$exit_status"}, "n": {"$sum": 1}}},
        {"$sort": {"_id.state": 1, "_id.exit_status": 1}},
    ],
    [
        {"$match": {"history.runtime": {"$ne": None}}},
        {"$project": {"history": 1}},
        {"$unwind": "$history"},
        {"$match": {"history.runtime": {"$ne": None}}},
        {"$group": {"_id": "$history.exit_status", "v": {"$sum": 1}}},
        {"$sort": {"_id": 1}},
    ],
    [
        {"$match": {"history.runtime": {"$ne": None}}},
        {"$project": {"history": 1}},
        {"$unwind": "$history"},
        {"$group": {"_id": None, "v": {"$sum": "$history.runtime"}}},
    ],
    [
        {"$match": {"history.runtime": {"$ne": None}}},
        {"$project": {"history": 1}},
        {"$unwind": "$history"},
        {"$sort": {"history.runtime": 1, "_id": 1}},
        {"$skip": 10},
        {"$limit": 5},
        {"$project": {"history.runtime": 1}},
    ],
    [{"$match": {"owner": "ann"}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}, {"$sort": {"n": -1, "_id": 1}}],
]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[str(i) for i in range(len(PIPELINES))])
def test_aggregations(readonly, pipeline):
    _same(readonly, lambda c: list(c.aggregate(pipeline)))
