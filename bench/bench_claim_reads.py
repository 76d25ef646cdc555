"""Claims of one task at a time, each claim reading its candidates or the
claims of a process sharing one read (banyan/server/ready_candidates.py).

    python bench/bench_claim_reads.py --mongo-uri mongodb://127.0.0.1:27017 [--tasks 1000] [--claims 200]

For each store (the embedded store, and the database at --mongo-uri) and
each way of reading: --tasks ready tasks in a fresh database, then
--processes `TaskQueue`s over it (standing for server processes), each with
--threads claimers that claim one task at a time (`claim_next`, as a worker
of one free core does) until --claims are claimed. Prints claims/s and the
sorted reads made. The two ways run in the same run, one after the other,
on the same machine: compare their ratio, not the figures across runs.
"""

import argparse
import shutil
import tempfile
import threading
import uuid

from benchkit import timed_threads
from bson import ObjectId

from banyan.server.states import TaskQueue, utcnow
from banyan.server.store import connect

ONE_CORE = {"cores": 1, "memory": 1 << 40, "gpus": 0}


def seed(queue, n):
    now = utcnow().replace(microsecond=0)
    docs = [
        {
            "command": "true",
            "state": "available",
            "priority": i % 3,
            "max_retries": 0,
            "continuations": [],
            "requested_resources": {"cores": 1, "memory": 0, "gpus": 0},
            "_created": now,
            "_updated": now,
            "_etag": uuid.uuid4().hex,
        }
        for i in range(n)
    ]
    queue.prepare_new(docs)
    for start in range(0, n, 500):
        queue.tasks.insert_many(docs[start : start + 500])


def run(db, shared, tasks, claims, processes, threads):
    queues = [TaskQueue(db, share_claim_reads=shared) for _ in range(processes)]
    seed(queues[0], tasks)
    left = [claims]
    lock = threading.Lock()

    def claimer(queue):
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            if queue.claim_next(ObjectId(), ONE_CORE) is None:
                return

    seconds = timed_threads([threading.Thread(target=claimer, args=(q,)) for q in queues for _ in range(threads)])
    reads = sum(q._shared.reads for q in queues) if shared else claims
    return {"per_s": claims / seconds, "seconds": seconds, "reads": reads}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mongo-uri", help="a MongoDB-protocol server (FerretDB: the case this is about)")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    stores = [("embedded store", None)] + ([("database", args.mongo_uri)] if args.mongo_uri else [])
    rows = []
    for label, uri in stores:
        for shared in (False, True):
            tmp = tempfile.mkdtemp(prefix="bench-claim-reads-")
            client = connect(mongo_uri=uri, data_dir=None if uri else tmp)
            name = "bench_reads_%s" % uuid.uuid4().hex[:10]
            try:
                row = run(client[name], shared, args.tasks, args.claims, args.processes, args.threads)
            finally:
                if uri:
                    client.drop_database(name)
                client.close()
                shutil.rmtree(tmp, ignore_errors=True)
            way = "one read per process (shared)" if shared else "one read per claim"
            print(label, way, row, flush=True)
            rows.append((label, way, row))
    print()
    print(
        "| store | reads | claims of one task, %d processes x %d threads, %d ready | sorted reads |"
        % (args.processes, args.threads, args.tasks)
    )
    print("|---|---|---|---|")
    for label, way, row in rows:
        print("| %s | %s | %.1f claims/s | %d |" % (label, way, row["per_s"], row["reads"]))


if __name__ == "__main__":
    main()
