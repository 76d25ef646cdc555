"""What a supervisor costs per attempt: one `true` run through TaskProcess.

    python bench/bench_supervisor.py [--runs 50]

For each way of starting the supervisor (a new interpreter, or forked by the
worker's spawner) and each containment (subreaper tracking only, and a cgroup
v2 per attempt where this user can make one): the median and p95 of the time
from `start()` to the attempt's outcome, and the CPU per attempt of this
process and its children (the spawner's forks are not its children: their
CPU shows in the spawner's, with that of the supervisors it keeps for later
attempts, which is printed as well). Attempts are
`--gap` seconds apart (default 0.05, as one task at a time sees it: moving
a process into a cgroup is cheap only right after another move, and costs
an RCU grace period, 10-20 ms, otherwise; `--gap 0` runs them back to back).
Prints, asserts nothing; figures depend on what else runs on the machine.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from banyan.worker import containment  # noqa: E402
from banyan.worker.executor import Spawner, TaskProcess  # noqa: E402


def cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tree_cpu(pid):
    """CPU seconds of the process `pid`, of its live children (supervisors
    waiting for their next attempt) and of its children that exited."""
    root = psutil.Process(pid)
    total = sum(root.cpu_times()[:4])
    for child in root.children():
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass  # exited just now: its figures go to the spawner's
    return total


def run(tmp, mode, spawner, runs, gap=0.0):
    found = containment.detect(os.path.join(tmp, "work-" + mode), mode)
    spawner_cpu = (lambda: tree_cpu(spawner._proc.pid)) if spawner else (lambda: 0.0)
    times = []
    try:
        cpu0, spawner0 = cpu_seconds(), None
        for i in range(runs):
            name = "%s-%d" % (mode, i)
            proc = TaskProcess(
                {"_id": name, "command": ["true"]},
                1,
                os.path.join(tmp, name),
                containment=found.spec_for(name),
                spawner=spawner,
            )
            started = time.perf_counter()
            proc.start()
            while proc.poll() is None:
                time.sleep(0.0005)
            times.append(time.perf_counter() - started)
            time.sleep(gap)
            if spawner0 is None:  # the spawner starts with the first attempt: not counted
                spawner0 = spawner_cpu()
        cpu = (cpu_seconds() - cpu0) / runs
        forks = (spawner_cpu() - spawner0) / max(1, runs - 1)
    finally:
        found.release()
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], cpu, forks, found.mode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between two attempts")
    args = parser.parse_args()
    print(
        "machine: %d CPUs, load average %s; %g s between attempts"
        % (os.cpu_count(), " ".join("%.2f" % x for x in os.getloadavg()), args.gap)
    )
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("interpreter", "spawner"):
            spawner = Spawner() if label == "spawner" else None
            try:
                for mode in ("subreaper", "auto"):
                    median, p95, cpu, forks, used = run(tmp, mode, spawner, args.runs, args.gap)
                    print(
                        "%-11s %-9s start to outcome: median %.1f ms, p95 %.1f ms; CPU per attempt: "
                        "this process and children %.1f ms, spawner %.1f ms"
                        % (label, used, median * 1000, p95 * 1000, cpu * 1000, forks * 1000)
                    )
            finally:
                if spawner:
                    spawner.close()


if __name__ == "__main__":
    main()
