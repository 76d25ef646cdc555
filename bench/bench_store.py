"""Embedded store throughput (ops/s) as the collection grows.

Not run by CI.  Usage: python bench/bench_store.py [--sizes 1000,10000,100000]
                       [--seconds 2] [--no-mongomock]
Each write is fsynced (group commit), so figures include the disk.
"""

import argparse
import datetime
import random
import shutil
import tempfile
import time

import mongomock
from pymongo import ReturnDocument

from banyan.server.store import EmbeddedClient

CLAIM_INDEX = [("state", 1), ("pending_dependency_count", 1), ("priority", -1), ("_created", 1)]
CLAIM_FILTER = {"state": "available", "pending_dependency_count": 0, "requested_resources.cores": {"$lte": 2}}
CLAIM_SORT = [("priority", -1), ("_created", 1)]
T0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def make_doc(rng, i):
    return {
        "name": "task-%d" % i,
        "state": "available" if rng.random() < 0.7 else rng.choice(["running", "done"]),
        "pending_dependency_count": 0 if rng.random() < 0.8 else 1,
        "priority": rng.randrange(10),
        "_created": T0 + datetime.timedelta(milliseconds=i),
        "requested_resources": {"cores": rng.randrange(1, 5), "memory": 2**30},
        "command": "echo %d" % i,
        "continuations": [],
        "owner": rng.choice(["ann", "bob"]),
    }


def rate(fn, seconds, max_ops):
    """Call fn() repeatedly for about `seconds`; return ops/s."""
    n = 0
    start = time.perf_counter()
    while n < max_ops:
        fn()
        n += 1
        if time.perf_counter() - start > seconds:
            break
    return n / (time.perf_counter() - start)


def setup(coll, size, rng):
    coll.create_index(CLAIM_INDEX)
    coll.create_index([("continuations", 1)])
    coll.create_index([("worker", 1), ("state", 1)])
    ids = []
    for start in range(0, size, 1000):
        docs = [make_doc(rng, i) for i in range(start, min(size, start + 1000))]
        ids.extend(coll.insert_many(docs).inserted_ids)
    return ids


def measure(coll, ids, rng, seconds, max_ops):
    counter = [len(ids)]

    def by_id():
        coll.find_one_and_update(
            {"_id": rng.choice(ids)}, {"$inc": {"touched": 1}}, return_document=ReturnDocument.AFTER
        )

    def claim():
        doc = coll.find_one_and_update(CLAIM_FILTER, {"$set": {"state": "running", "worker": "w1"}}, sort=CLAIM_SORT)
        assert doc is not None

    def insert_one():
        counter[0] += 1
        coll.insert_one(make_doc(rng, counter[0]))

    def insert_many():
        docs = [make_doc(rng, counter[0] + k) for k in range(100)]
        counter[0] += 100
        coll.insert_many(docs)

    return {
        "foau by _id": rate(by_id, seconds, max_ops),
        "sorted claim": rate(claim, seconds, min(max_ops, coll.count_documents(CLAIM_FILTER) - 1)),
        "insert_one": rate(insert_one, seconds, max_ops),
        "insert_many(100)": rate(insert_many, seconds, max_ops),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-mongomock", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        rng = random.Random(size)
        data_dir = tempfile.mkdtemp(prefix="bench_store_")
        try:
            client = EmbeddedClient(data_dir)
            coll = client["bench"]["tasks"]
            t = time.perf_counter()
            ids = setup(coll, size, rng)
            load = time.perf_counter() - t
            result = measure(coll, ids, rng, args.seconds, 20000)
            client.close()
            t = time.perf_counter()
            EmbeddedClient(data_dir).close()
            reopen = time.perf_counter() - t
            rows.append(("embedded", size, result, load, reopen))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        if size == 10000 and not args.no_mongomock:
            rng = random.Random(size)
            coll = mongomock.MongoClient(tz_aware=True)["bench"]["tasks"]
            ids = setup(coll, size, rng)
            rows.append(("mongomock", size, measure(coll, ids, rng, args.seconds, 50), None, None))

    cols = ["foau by _id", "sorted claim", "insert_one", "insert_many(100)"]
    print("%-10s %8s" % ("store", "docs") + "".join("%18s" % c for c in cols) + "%10s %10s" % ("load s", "reopen s"))
    for name, size, result, load, reopen in rows:
        print(
            "%-10s %8d" % (name, size)
            + "".join("%18.0f" % result[c] for c in cols)
            + ("%10.1f %10.1f" % (load, reopen) if load is not None else "")
        )
    print("(ops/s; insert_many(100) counts calls, not documents)")


if __name__ == "__main__":
    main()
