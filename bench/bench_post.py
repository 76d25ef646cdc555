"""POST throughput on the embedded store with a queue already holding tasks.

Starts a real `banyan server` on a fresh data dir, preloads --preload tasks
with bulk POSTs, then times single POSTs and bulk POSTs of 100 over HTTP.

    python bench/bench_post.py [--preload 10000] [--singles 1000] [--bulks 30] [--keys]

With --keys every timed POST carries a new Idempotency-Key (as the client
sends them), and the same single POSTs are then sent again with their keys
(answered from the stored first answers).
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
import uuid

import requests


def start_server(data_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "banyan.cli", "server", "--port", "0", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    url = re.search(r"(http://\S+)", proc.stdout.readline().decode()).group(1)
    return proc, url


def task(i):
    return {"name": "t%d" % i, "command": "true", "requested_resources": {"memory": "1 MiB"}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preload", type=int, default=10000)
    parser.add_argument("--singles", type=int, default=1000)
    parser.add_argument("--bulks", type=int, default=30)
    parser.add_argument("--keys", action="store_true", help="send an Idempotency-Key with every timed POST")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = start_server(data_dir)
        try:
            s = requests.Session()
            t0 = time.perf_counter()
            for start in range(0, args.preload, 100):
                r = s.post(url + "/tasks", json=[task(i) for i in range(start, min(start + 100, args.preload))])
                r.raise_for_status()
            preload = time.perf_counter() - t0

            keys = [{"Idempotency-Key": str(uuid.uuid4())} if args.keys else {} for _ in range(args.singles)]
            t0 = time.perf_counter()
            for i in range(args.singles):
                s.post(url + "/tasks", json=task(i), headers=keys[i]).raise_for_status()
            singles = time.perf_counter() - t0

            replays = None
            if args.keys:
                t0 = time.perf_counter()
                for i in range(args.singles):
                    s.post(url + "/tasks", json=task(i), headers=keys[i]).raise_for_status()
                replays = time.perf_counter() - t0

            t0 = time.perf_counter()
            for _b in range(args.bulks):
                headers = {"Idempotency-Key": str(uuid.uuid4())} if args.keys else {}
                s.post(url + "/tasks", json=[task(i) for i in range(100)], headers=headers).raise_for_status()
            bulks = time.perf_counter() - t0
            stored = s.get(url + "/tasks", params={"max_results": 1}).json()["_meta"]["total"]
        finally:
            proc.terminate()
            proc.wait()
    print(
        "embedded store, %d tasks preloaded in %.1f s%s"
        % (args.preload, preload, "; Idempotency-Key on every timed POST" if args.keys else "")
    )
    print("%-28s %10s %12s" % ("operation", "requests/s", "tasks/s"))
    print("%-28s %10.0f %12.0f" % ("single POST", args.singles / singles, args.singles / singles))
    if replays is not None:
        print("%-28s %10.0f %12s" % ("single POST, key replayed", args.singles / replays, "0"))
    print("%-28s %10.1f %12.0f" % ("bulk POST of 100", args.bulks / bulks, 100 * args.bulks / bulks))
    print("tasks stored at the end: %d" % stored)


if __name__ == "__main__":
    main()
