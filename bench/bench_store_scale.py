"""The embedded store at scale, through a real `banyan server` process.

For each size: a data directory holding that many tasks (half finished
over the last 30 days, with one history entry each, as a busy queue has;
the other half available), written directly through the store; then a `banyan server` on
it, and:

- restart: from spawning the server to its first answer;
- RSS: resident memory of the server once it answers, and after the runs;
- claims: tasks claimed per second by batch claims (`max_tasks` 64), the
  best of three rounds, and that rate as a ratio to the rate with the
  smallest size (1,000 tasks) stored;
- /stats: time of the first `GET /stats` after the start, and of the next
  one (the store then keeps each task's rows of its pipelines);
- crash, /stats3: after a kill -9 of that server (no clean close), the
  next start and its first `GET /stats`;
- restart2, /stats2: after a clean stop (SIGINT) of the server started
  after the crash, the next start and its first `GET /stats`;
- GET p99 during a full scan: single-task `GET /tasks/<id>` latencies while
  another client loops full scans (`where` with `$nin`, sort on an
  unindexed field) and `GET /stats`.

Goals (issue 20): 1,000,000 tasks in under 3 GiB, restart under 30 s,
claims at 1,000,000 at least 0.8x those at 1,000, `/stats` under 300 ms at
100,000. A size whose memory (extrapolated from the largest size run) would
not fit in the machine's available memory, or whose time would not fit in
--time-limit, is skipped and its figures extrapolated.

    python bench/bench_store_scale.py [--sizes 1000 100000 1000000] [--seconds 10] [--time-limit 3000]
"""

import argparse
import copy
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta

import psutil
import requests
from bson import ObjectId

from banyan.server.app import create_app
from banyan.server.states import utcnow
from banyan.server.store import connect
from banyan.store import journal

FREE = {"cores": 64, "memory": 1 << 40, "gpus": 0}
#: The finished tasks ended over the last 30 days, evenly: a lab server's
#: month (the last hour's, which `/stats` reads one by one, are 1/720 of them).
MONTH = 30 * 24 * 3600


def build(data_dir, n):
    """n tasks in a fresh store at data_dir: half finished with history.

    The first task goes through the API (its shape and the indexes are the
    server's); the others are copies of it appended to the journal in the
    store's own record format, which the server's first start replays and
    compacts (a million inserts through the store took far longer)."""
    client = connect(data_dir=data_dir)
    app = create_app(client, {"MONGO_DBNAME": "banyan"})
    r = app.test_client().post(
        "/tasks",
        json={
            "name": "model",
            "command": ["echo", "hello"],
            "requested_resources": {"memory": "1 MiB"},
            "state": "available",
        },
    )
    assert r.status_code == 201, r.json
    model = client["banyan"].tasks.find_one()
    client.close()
    now = utcnow()
    path = os.path.join(data_dir, journal.JOURNAL)
    with open(path, "ab") as f:
        if f.tell() == 0:
            f.write(journal.format_record())
        for start in range(0, n - 1, 1000):
            docs = []
            for i in range(start, min(n - 1, start + 1000)):
                doc = copy.deepcopy(model)
                doc["_id"] = ObjectId()
                doc["name"] = "task %d" % i
                doc["command"] = ["echo", str(i)]
                if i % 2:
                    ended = now - timedelta(seconds=MONTH * (n - i) / n)
                    doc.update(
                        state="terminated",
                        exit_status="success",
                        history=[
                            {
                                "worker": ObjectId(),
                                "started": ended - timedelta(seconds=90),
                                "ended": ended,
                                "exit_status": "success",
                                "exit_code": 0,
                                "runtime": 90.0 + i % 7,
                            }
                        ],
                        queue_wait=1.5 + i % 5,
                    )
                docs.append(doc)
            f.write(journal.frame([{"o": "p", "d": "banyan", "c": "tasks", "docs": docs}]))
        f.flush()
        os.fsync(f.fileno())


def start_server(data_dir):
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "banyan.cli", "server", "--port", "0", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)
    while True:
        try:
            requests.get(url + "/tasks?max_results=1", timeout=60)
            break
        except requests.ConnectionError:
            time.sleep(0.01)
    return proc, url, time.perf_counter() - started


def progress(n, what):
    print("  %d tasks: %s" % (n, what), file=sys.stderr, flush=True)


def rss_mib(proc):
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def claims_per_second(url, target=1000, rounds=3):
    """Tasks claimed per second by batch claims of 64, the best of `rounds`
    rounds of target/rounds tasks (the machine is shared: the best round is
    the one least slowed by others)."""
    s = requests.Session()
    wid = s.post(url + "/workers", json={"host": "bench", "resources": FREE}).json()["_id"]
    best = 0
    for _ in range(rounds):
        got, started = 0, time.perf_counter()
        while got < target // rounds:
            r = s.post(url + "/workers/%s/claim" % wid, json={"free": FREE, "max_tasks": 64})
            assert r.status_code == 200, r.text
            items = len(r.json()["_items"])
            if not items:
                break
            got += items
        if got:
            best = max(best, got / (time.perf_counter() - started))
    return best


def restart_and_first_stats(proc, data_dir, sig):
    """Stop the server with `sig`, start it again on `data_dir`: (new process,
    seconds to answer, seconds of its first /stats)."""
    proc.send_signal(sig)
    proc.wait()
    proc, url, restart = start_server(data_dir)
    t0 = time.perf_counter()
    requests.get(url + "/stats").raise_for_status()
    return proc, restart, time.perf_counter() - t0


def get_p99_during_scans(url, seconds):
    s = requests.Session()
    page = s.get(url + "/tasks", params={"max_results": 200, "projection": '{"name": 1}'}).json()
    ids = [t["_id"] for t in page["_items"]]
    stop = threading.Event()
    scans = []

    def scanner():
        scanning = requests.Session()
        params = {
            "where": json.dumps({"state": {"$nin": ["cancelled"]}}),
            "sort": '[["command", -1]]',
            "max_results": 50,
        }
        while not stop.is_set():
            t0 = time.perf_counter()
            scanning.get(url + "/tasks", params=params)
            scanning.get(url + "/stats")
            scans.append(time.perf_counter() - t0)

    thread = threading.Thread(target=scanner, daemon=True)
    thread.start()
    latencies = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        r = s.get(url + "/tasks/" + ids[i % len(ids)])
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200
        i += 1
    stop.set()
    thread.join()
    latencies.sort()
    return latencies[int(0.99 * (len(latencies) - 1))], len(latencies), statistics.mean(scans) if scans else 0


def run(n, seconds, tmp):
    data_dir = os.path.join(tmp, "store-%d" % n)
    t0 = time.perf_counter()
    build(data_dir, n)
    built = time.perf_counter() - t0
    progress(n, "built in %.0f s" % built)
    proc, url, first = start_server(data_dir)  # the first start compacts what build() wrote
    proc.terminate()
    proc.wait()
    progress(n, "first start (replay and compaction) %.1f s" % first)
    proc, url, restart = start_server(data_dir)
    try:
        rss_start = rss_mib(proc)
        progress(n, "restart %.1f s, RSS %.0f MiB" % (restart, rss_start))
        t0 = time.perf_counter()
        requests.get(url + "/stats").raise_for_status()
        stats_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        requests.get(url + "/stats").raise_for_status()
        stats_again = time.perf_counter() - t0
        progress(n, "/stats %.3f s, again %.3f s, RSS %.0f MiB" % (stats_s, stats_again, rss_mib(proc)))
        p99, gets, scan_s = get_p99_during_scans(url, seconds)
        progress(n, "GET p99 %.1f ms during scans" % (1000 * p99))
        claims = claims_per_second(url)
        rss_end = rss_mib(proc)
        proc, restart_crash, stats_crash = restart_and_first_stats(proc, data_dir, signal.SIGKILL)  # a crash
        progress(n, "after a crash: restart %.1f s, first /stats %.3f s" % (restart_crash, stats_crash))
        proc, restart_used, stats_used = restart_and_first_stats(proc, data_dir, signal.SIGINT)  # as Ctrl-C
        progress(n, "after a clean stop: restart %.1f s, first /stats %.3f s" % (restart_used, stats_used))
    finally:
        proc.terminate()
        proc.wait()
    disk = sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir)) / 2**20
    return dict(
        n=n,
        built=built,
        restart=restart,
        rss_start=rss_start,
        rss_end=rss_end,
        disk=disk,
        stats=stats_s,
        stats_again=stats_again,
        p99=p99,
        gets=gets,
        scan=scan_s,
        claims=claims,
        restart_used=restart_used,
        stats_used=stats_used,
        restart_crash=restart_crash,
        stats_crash=stats_crash,
    )


def fits(n, done, budget_s, started):
    """None if size n may run, else why not: from the largest size run so
    far, its memory (linear in the tasks) must fit in 80% of the memory
    available now, and its time (linear too) within what is left of the
    time budget."""
    if not done:
        return None
    first, last = done[0], done[-1]
    scale = n / float(last["n"])
    if last is first:  # what the tasks added to the server's memory at start, per task
        per_task = (last["rss_end"] - last["rss_start"]) / last["n"]
    else:
        per_task = (last["rss_end"] - first["rss_end"]) / (last["n"] - first["n"])
    rss = last["rss_end"] + per_task * (n - last["n"])
    available = psutil.virtual_memory().available / 2**20
    if rss > 0.8 * available:
        return "needs ~%.0f MiB, %.0f MiB available" % (rss, available)
    if budget_s and last["n"] * 20 >= n:  # (a much smaller size's time is mostly fixed costs)
        needed = last["took"] * scale
        left = budget_s - (time.perf_counter() - started)
        if needed > left:
            return "needs ~%.0f s, %.0f s left of --time-limit" % (needed, left)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--seconds", type=float, default=10, help="length of the GET-during-scans run")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=3000,
        help="seconds for the whole run: a size that would not end within it is skipped "
        "(and extrapolated from the largest size run)",
    )
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="banyan-bench-")
    started = time.perf_counter()
    done = []
    print(
        "%8s %9s %9s %9s %9s %8s %9s %9s %12s %9s %10s %9s %9s %9s %9s %9s"
        % (
            "tasks",
            "restart",
            "RSS MiB",
            "RSS end",
            "KiB/task",
            "disk MiB",
            "/stats",
            "again",
            "GET p99",
            "scan+stats",
            "claims/s",
            "claims x",
            "crash",
            "/stats3",
            "restart2",
            "/stats2",
        )
    )
    try:
        for n in sorted(args.sizes):
            why = fits(n, done, args.time_limit, started)
            if why:
                last = done[-1]
                scale = n / float(last["n"])
                grow = (last["rss_end"] - done[0]["rss_end"]) / max(1, last["n"] - done[0]["n"])
                print(
                    "%8d skipped (%s); linear from %d tasks: RSS ~%.0f MiB, restart ~%.0f s"
                    % (n, why, last["n"], last["rss_end"] + grow * (n - last["n"]), last["restart"] * scale),
                    flush=True,
                )
                continue
            t0 = time.perf_counter()
            f = run(n, args.seconds, tmp)
            f["took"] = time.perf_counter() - t0
            shutil.rmtree(os.path.join(tmp, "store-%d" % n), ignore_errors=True)
            done.append(f)
            base = done[0]["claims"]
            per_task = (f["rss_end"] - done[0]["rss_end"] * (len(done) > 1)) * 1024 / n
            print(
                "%8d %8.2fs %9.0f %9.0f %9.2f %8.1f %8.3fs %8.3fs %9.1f ms %8.2fs %10.0f %8.2fx"
                " %8.2fs %8.3fs %8.2fs %8.3fs"
                "   (%d GETs)"
                % (
                    n,
                    f["restart"],
                    f["rss_start"],
                    f["rss_end"],
                    per_task,
                    f["disk"],
                    f["stats"],
                    f["stats_again"],
                    1000 * f["p99"],
                    f["scan"],
                    f["claims"],
                    f["claims"] / base,
                    f["restart_crash"],
                    f["stats_crash"],
                    f["restart_used"],
                    f["stats_used"],
                    f["gets"],
                ),
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        "KiB/task: resident memory over that of the smallest size, per task; claims x: claims/s as a ratio "
        "to the smallest size's; crash, /stats3: a start after a kill -9 of the server that served the runs, "
        "and its first /stats; restart2, /stats2: a start after a clean stop (SIGINT) of that next server, "
        "and its first /stats"
    )


if __name__ == "__main__":
    main()
