"""The first `GET /stats` of a new store filled through a real `banyan server`.

    python bench/bench_new_store_stats.py [--tasks 100000]

Starts `banyan server` (embedded store) on a new data directory, POSTs
--tasks `true` tasks, 1,000 per request, then times `GET /stats` twice.
The server defines `/stats`' views at the start of a new store, so they
grow with it (`serve.define_stats_views`): the first `/stats` then builds
nothing. `bench_store_scale.py` measures a store written directly, which
has no views until a server starts on it. Prints, asserts nothing.
"""

import argparse
import os
import shutil
import tempfile
import time

import urllib3
from benchkit import banyan_server

BATCH = 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100000)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-new-store-")
    try:
        with banyan_server(os.path.join(tmp, "data")) as url:
            http = urllib3.PoolManager()
            start = time.perf_counter()
            for first in range(0, args.tasks, BATCH):
                body = [{"command": "true", "name": "t%d" % i} for i in range(first, min(args.tasks, first + BATCH))]
                reply = http.request("POST", url + "/tasks", json=body)
                if reply.status != 201:
                    raise SystemExit("POST /tasks answered %d: %r" % (reply.status, reply.data[:300]))
            posted = time.perf_counter() - start
            times = []
            for _ in range(2):
                start = time.perf_counter()
                reply = http.request("GET", url + "/stats")
                times.append(time.perf_counter() - start)
            print(
                "%d tasks POSTed in %.1f s; first GET /stats %.3f s (total %s), again %.3f s"
                % (args.tasks, posted, times[0], reply.json()["total"], times[1])
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
