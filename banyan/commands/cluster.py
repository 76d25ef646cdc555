"""`banyan stats` (the queue in figures) and `banyan workers` (the machines)."""

import functools
import sys

from banyan.commands.base import (
    add_command,
    connect,
    format_bytes,
    format_duration,
    format_number,
    format_time,
    print_json,
    print_table,
)
from banyan.errors import BanyanError
from banyan.protocol import Outcome, TaskState, WorkerState

STATS_EPILOG = """
Users see the figures of their own tasks; admins and workers of all.
The same figures are on the server's web page, /dashboard.

examples:
  banyan stats
  banyan stats --json
"""

WORKERS_EPILOG = """
examples:
  banyan workers
  banyan workers --all --json
"""


def register(sub):
    stats = add_command(
        sub,
        "stats",
        run_stats,
        help="statistics of the queue",
        description="Show task counts by state and outcome, attempt runtimes, "
        "queue waits, throughput, and the workers' load.",
        epilog=STATS_EPILOG,
    )
    stats.add_argument("--json", action="store_true", help="print the server's /stats answer as JSON")
    workers = add_command(
        sub,
        "workers",
        run_workers,
        help="list the workers",
        description="List the workers: host, state, resources in use and in total, "
        "running tasks and last heartbeat. Stopped workers are left out "
        "unless --all.",
        epilog=WORKERS_EPILOG,
    )
    workers.add_argument("--all", action="store_true", help="include stopped workers")
    workers.add_argument("--json", action="store_true", help="print the workers as the API returns them")


STATE_ORDER = tuple(s.value for s in TaskState)
OUTCOME_ORDER = tuple(
    o.value
    for o in (Outcome.SUCCESS, Outcome.FAILURE, Outcome.OOM, Outcome.TIMEOUT, Outcome.CANCELLED, Outcome.ABANDONED)
)


def _ordered(counts, order):
    """`counts` in the order people read them (the lifecycle), unknown keys last."""
    keys = [key for key in order if key in counts] + sorted(key for key in counts if key not in order)
    return {key: counts[key] for key in keys}


def _distribution(d):
    if not d or not d.get("count"):
        return "none yet"
    return "mean %s, median %s, p95 %s, max %s" % tuple(
        format_duration(d.get(key)) for key in ("mean", "median", "p95", "max")
    )


def run_stats(args):
    client = connect(args)
    stats = client.stats()
    if args.json:
        print_json(stats)
        return 0
    states = _ordered(stats.get("states") or {}, STATE_ORDER)
    outcomes = _ordered(stats.get("outcomes") or {}, OUTCOME_ORDER)
    attempts = stats.get("attempts") or {}
    throughput = stats.get("throughput") or {}
    lines = [
        ("tasks", "%d (%s)" % (stats.get("total", 0), ", ".join("%s %d" % kv for kv in states.items()))),
        ("outcomes", ", ".join("%s %d" % kv for kv in outcomes.items())),
        ("attempts", "%d finished; runtime %s" % (attempts.get("count", 0), _distribution(attempts.get("runtime")))),
        ("queue wait", _distribution(stats.get("queue_wait"))),
        (
            "throughput",
            "%d finished in the last hour (%d succeeded)"
            % (throughput.get("finished", 0), throughput.get("succeeded", 0)),
        ),
    ]
    try:
        summary = client.worker_stats().get("summary") or {}
    except BanyanError:
        summary = None
    if summary:
        worker_states = summary.get("states") or {}
        used = ", ".join(
            "%s %s/%s"
            % (
                key,
                *(
                    (format_bytes(summary[key]["used"]), format_bytes(summary[key]["total"]))
                    if key == "memory"
                    else (format_number(summary[key]["used"]), format_number(summary[key]["total"]))
                ),
            )
            for key in ("cores", "memory", "gpus")
            if key in summary
        )
        lines.append(
            (
                "workers",
                "%s; %d tasks running; in use: %s"
                % (
                    ", ".join("%d %s" % (n, state) for state, n in worker_states.items()),
                    summary.get("running", 0),
                    used,
                ),
            )
        )
    for key, value in lines:
        print("%-11s %s" % (key, value))
    return 0


def run_workers(args):
    client = connect(args)
    workers = client.list_workers().get("_items", [])
    hidden = 0
    if not args.all:
        shown = [w for w in workers if w.get("state") != WorkerState.STOPPED]
        hidden, workers = len(workers) - len(shown), shown
    if args.json:
        print_json(workers)
        return 0
    try:
        load = {w["_id"]: w for w in client.worker_stats().get("_items", [])}
    except BanyanError:
        load = {}
    rows = []
    for w in workers:
        resources = w.get("resources") or {}
        used = (load.get(w["_id"]) or {}).get("used") or {}
        pair = functools.partial(_used_of_total, resources, used)
        rows.append(
            [
                w["_id"],
                w.get("host") or "",
                w.get("state") or "",
                pair("cores", format_number),
                pair("memory", format_bytes),
                pair("gpus", format_number),
                len(w.get("running") or []),
                format_time(w.get("last_heartbeat")),
            ]
        )
    if rows:
        print_table(("ID", "HOST", "STATE", "CORES", "MEMORY", "GPUS", "RUNNING", "LAST HEARTBEAT"), rows)
    else:
        print("no workers%s" % ("" if args.all else " (start one with banyan-worker, or banyan up)"), file=sys.stderr)
    if hidden:
        print(
            "(%d stopped worker%s not shown; --all shows them)" % (hidden, "" if hidden == 1 else "s"), file=sys.stderr
        )
    return 0


def _used_of_total(resources, used, key, fmt):
    """A worker's resource as "used/total" (the total alone without figures of use)."""
    total = fmt(resources.get(key, 0) or 0)
    return "%s/%s" % (fmt(used.get(key) or 0), total) if used else total
