"""Start-up time of the `banyan` command, as a user meets it.

    .venv/bin/python bench/bench_cli_startup.py [--runs 10]

Times, as wall clock of the whole process (median, min, max of --runs):
`banyan --help`; `banyan ls` and `banyan wait ID` (a cancelled task: exit code 1) against a
real `banyan server` (embedded store, fresh data directory) on this machine.
Also prints what `import banyan.cli` costs and whether it loads any of the
server's libraries (it should load none), and the request `banyan ls` makes
timed alone from this process (the server's share of its time), and the
interpreter's start with and without `urllib3` (the client's HTTP library,
which `banyan ls` needs and `--help` does not load): what is left is Banyan's
own share. Each command's CPU time (user + system) is printed too: on a
shared machine its wall clock also counts waiting for a core, and the CPU
time is close to what the wall clock is on an idle machine. The goal is
under 150 ms for `banyan --help` and `banyan ls`. Asserts nothing.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import requests
from benchkit import banyan_server

BIN = os.path.dirname(sys.executable)
BANYAN = os.path.join(BIN, "banyan")
SERVER_MODULES = ("eve", "flask", "pymongo", "mongomock", "cerberus", "waitress", "requests")


def timed(cmd, runs, env, ok=()):
    """Wall-clock seconds of `runs` runs of `cmd`, and the CPU seconds (user +
    system) each took: on a busy machine the wall clock also counts the wait
    for a core, the CPU time does not. Exit codes other than 0 and `ok` stop
    the bench."""
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode not in (0,) + tuple(ok):
            raise SystemExit("%s failed: %s" % (" ".join(cmd), result.stderr.decode()))
    return times, cpu


def timed_request(http, url, runs):
    """Wall-clock seconds of `runs` GETs of `url` from this process: the server's share of a command."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        http.get(url).raise_for_status()
        times.append(time.perf_counter() - start)
    return times, None


def show(label, measured):
    times, cpu = measured
    print(
        "%-30s median %6.1f ms  (min %6.1f, max %6.1f, %d runs)%s"
        % (
            label,
            1000 * statistics.median(times),
            1000 * min(times),
            1000 * max(times),
            len(times),
            "  CPU median %5.1f ms" % (1000 * statistics.median(cpu)) if cpu else "",
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    probe = (
        "import sys, time; t = time.perf_counter(); import banyan.cli; "
        "print('%.1f' % (1000 * (time.perf_counter() - t))); "
        "print(' '.join(m for m in " + repr(SERVER_MODULES) + " if m in sys.modules) or '-')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    print("import banyan.cli: %s ms; server libraries loaded: %s" % (out[0], out[1]))
    base = [sys.executable, "-c", "pass"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANYAN_")}
    show("python -c pass", timed(base, args.runs, env))
    show("python -c 'import urllib3'", timed([sys.executable, "-c", "import urllib3"], args.runs, env))
    show("banyan --help", timed([BANYAN, "--help"], args.runs, env))

    tmp = tempfile.mkdtemp(prefix="bench-cli-")
    try:
        with banyan_server(os.path.join(tmp, "data"), stop_timeout=30) as url:
            env = dict(env, BANYAN_SERVER=url, HOME=tmp)
            http = requests.Session()
            task = http.post(url + "/tasks", json=[{"name": "t%d" % i} for i in range(20)]).json()["_items"][0]["_id"]
            http.patch(url + "/tasks/" + task, json={"state": "cancelled"}).raise_for_status()
            show("banyan ls (20 tasks)", timed([BANYAN, "ls"], args.runs, env))
            show("  its request alone", timed_request(http, url + "/tasks", args.runs))
            show("banyan wait ID (finished)", timed([BANYAN, "wait", task], args.runs, env, ok=(1,)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
