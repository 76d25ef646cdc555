"""Statistics, `/metrics` and the dashboard.

Statistics are virtual, read-only resources computed by every request from
`tasks` and `workers`, so they are right with several server processes
sharing one database, and cost nothing while nobody looks. The pipelines use
only what MongoDB (>= 5.0), FerretDB 1.24 and the embedded store all run
alike: `$match`, `$project` of plain fields, `$unwind`, `$sort`, `$skip`,
`$limit`, and `$group` with a single `$sum` (docs/DATABASES.md lists the
gaps). Durations are not computed in the database: claims and finishes
store them (`queue_wait` on a task, `runtime` on each ended attempt).

How each figure is computed:

- counts per state, and finished tasks by final `exit_status`: one `$group`
  on `(state, exit_status)`.
- runtimes of finished attempts and queue waits: count and sum from one
  `$group` each; the median and p95 from one pipeline that `$sort`s the
  durations and `$skip`s to the median's ranks, one more to p95's, and the
  max from one that sorts them the other way, so only the few values at those ranks leave the
  store. The median of an even count is the mean of the two middle values;
  p95 is the nearest rank, the value at rank ceil(0.95 n).
- throughput: finished attempts of the last 60 clock minutes (the current one
  included), bucketed by minute here from their end times.
- per-worker load: held tasks (`running`, `pending_cancellation`, as many as
  the workers' slots) summed per `worker`, joined with the `workers`
  collection.

Who sees what: any valid token may read statistics (`auth.require_role`); a
user's count only the tasks they own, admins' and workers' every task
(`visible_tasks`, through `auth.owner_filter`, is the one place that applies it).
Worker load is cluster-wide for every role (like `sinfo`): it shows counts
and resources, never which tasks.

Every duration in the answers is in seconds; every time is a string in Eve's
date format.
"""

import logging
import math
import os
from datetime import timedelta

from eve.utils import date_to_str
from flask import Blueprint, Response, abort, current_app, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from banyan.protocol import (
    EXIT_STATUSES,
    FINISHED,
    HELD,
    WORKER_STATES,
    TaskState,
    WorkerState,
)
from banyan.protocol import (
    RESOURCES as RESOURCE_KEYS,
)
from banyan.server import auth, store
from banyan.server.states import ABANDONED, FAILURE, OOM, SUCCESS, TIMEOUT, WORKERS, seconds_between, utcnow

log = logging.getLogger(__name__)

TASKS = "tasks"
#: Final exit statuses that count as a failed task (a cancelled one did not fail).
FAILED = (FAILURE, TIMEOUT, ABANDONED, OOM)
THROUGHPUT_MINUTES = 60
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


# -- the figures ---------------------------------------------------------


def task_stats(db, query=None, now=None):
    """Statistics of the tasks matching `query` (a Mongo filter, already
    restricted to what the caller may see). `now` is for tests."""
    tasks = db[TASKS]
    query = query or {}
    now = now or utcnow()
    counts = state_counts(tasks, query)
    return {
        "now": now,
        **counts,
        "attempts": attempt_stats(tasks, query),
        "queue_wait": queue_wait_stats(tasks, query),
        "throughput": throughput(tasks, query, now),
    }


def _match(query, extra):
    """A `$match` stage for `query` and `extra` together."""
    if not query:
        return {"$match": extra}
    return {"$match": {"$and": [query, extra]}}


def _only(*fields):
    """A `$project` of just the fields a pipeline reads, right after its
    `$match`: the store then copies those fields, not whole tasks."""
    return {"$project": {field: 1 for field in fields}}


def state_counts(tasks, query):
    """`total`, `states` (every state, zeros included), `outcomes` (finished
    tasks by final exit status), `succeeded` and `failed`."""
    states = {s.value: 0 for s in TaskState}
    outcomes = {status: 0 for status in EXIT_STATUSES}
    pipeline = [
        {"$match": query},
        _only("state", "exit_status"),
        {"$group": {"_id": {"state": "$state", "exit_status": "$exit_status"}, "n": {"$sum": 1}}},
    ]
    for row in tasks.aggregate(pipeline):
        state, status = row["_id"].get("state"), row["_id"].get("exit_status")
        states[state] = states.get(state, 0) + row["n"]
        if state in FINISHED and status is not None:
            outcomes[status] = outcomes.get(status, 0) + row["n"]
    return {
        "total": sum(states.values()),
        "states": states,
        "outcomes": outcomes,
        "succeeded": outcomes.get(SUCCESS, 0),
        "failed": sum(outcomes.get(s, 0) for s in FAILED),
    }


#: Finished attempts, one document each (`history` is the attempt), with
#: the `runtime` in seconds their finish stored.
def _finished_attempts(query):
    return [
        _match(query, {"history.runtime": {"$ne": None}}),
        _only("history"),
        {"$unwind": "$history"},
        {"$match": {"history.runtime": {"$ne": None}}},
    ]


def _path(doc, dotted):
    """The value at a dotted path of a document (None if absent)."""
    for key in dotted.split("."):
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _group(tasks, prefix, key, accumulator):
    """{group: value} of one accumulator. One `$group` per figure: FerretDB
    1.24 computes only the first accumulator of a `$group` (see
    docs/DATABASES.md)."""
    return {row["_id"]: row["v"] for row in tasks.aggregate(prefix + [{"$group": {"_id": key, "v": accumulator}}])}


def _largest(tasks, prefix, field):
    """The largest value of `field` in what `prefix` yields (a sort, not
    `$max`, which FerretDB 1.24 lacks)."""
    for row in tasks.aggregate(prefix + [{"$sort": {field: -1}}, {"$limit": 1}, {"$project": {field: 1}}]):
        return _path(row, field)
    return None


def attempt_stats(tasks, query):
    """Finished attempts: `count`, `by_exit_status`, and `runtime` (seconds:
    count, mean, median, p95, max)."""
    by_status = {status: 0 for status in EXIT_STATUSES}
    prefix = _finished_attempts(query)
    for status, n in _group(tasks, prefix, "$history.exit_status", {"$sum": 1}).items():
        by_status[status or "unknown"] = by_status.get(status or "unknown", 0) + n
    count = sum(by_status.values())
    total = sum(_group(tasks, prefix, None, {"$sum": "$history.runtime"}).values()) if count else 0
    return {
        "count": count,
        "by_exit_status": by_status,
        "runtime": _distribution(tasks, prefix, "history.runtime", count, total),
    }


def queue_wait_stats(tasks, query):
    """Time from creation to the first attempt's start (`queue_wait`, stored
    by the first claim), over the tasks that started at least once (seconds:
    count, mean, median, p95, max)."""
    prefix = [_match(query, {"queue_wait": {"$ne": None}}), _only("queue_wait")]
    count = sum(_group(tasks, prefix, None, {"$sum": 1}).values())
    total = sum(_group(tasks, prefix, None, {"$sum": "$queue_wait"}).values()) if count else 0
    return _distribution(tasks, prefix, "queue_wait", count, total)


def _ranks(n):
    """The 0-based ranks of the median (one or two) and of p95 among n sorted values."""
    median = [(n - 1) // 2, n // 2]
    p95 = max(0, math.ceil(0.95 * n) - 1)
    return median, p95


def _distribution(tasks, prefix, field, count, total):
    """count, mean, median, p95 and max (seconds) of `field` in the
    documents `prefix` yields. The median and p95 are read from the sorted
    values by one `$skip`/`$limit` pipeline, the max by one more."""
    if not count:
        return {"count": 0, "mean": None, "median": None, "p95": None, "max": None}
    (low, high), p95 = _ranks(count)
    middle = _at_ranks(tasks, prefix, field, low, high)
    largest = _largest(tasks, prefix, field)
    at_p95 = _at_ranks(tasks, prefix, field, p95, p95) if p95 > high else middle[-1:]
    if not at_p95:  # tasks changed between the pipelines
        at_p95 = middle[-1:] or [largest or 0]
    middle += [middle[-1] if middle else at_p95[0]] * (high - low + 1 - len(middle))
    return {
        "count": count,
        "mean": total / count,
        "median": (middle[0] + middle[-1]) / 2.0,
        "p95": at_p95[0],
        "max": largest if largest is not None else at_p95[0],
    }


def _at_ranks(tasks, prefix, field, first, last):
    """The values of `field` at 0-based ranks `first` to `last` in
    ascending order: one `$sort`/`$skip`/`$limit` pipeline (the embedded
    store answers it from a sorted view, reading just those rows)."""
    return [
        _path(row, field)
        for row in tasks.aggregate(
            prefix + [{"$sort": {field: 1}}, {"$skip": first}, {"$limit": last - first + 1}, {"$project": {field: 1}}]
        )
    ]


def throughput(tasks, query, now):
    """Finished attempts per minute over the last 60 clock minutes, oldest
    first; the last bucket is the current, partial, minute. The attempts'
    end times are bucketed here (date arithmetic in a pipeline is beyond
    FerretDB 1.24); an hour's worth is small."""
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=THROUGHPUT_MINUTES - 1)
    pipeline = [
        _match(query, {"history.ended": {"$gte": start}}),
        _only("history"),
        {"$unwind": "$history"},
        {"$match": {"history.ended": {"$gte": start}}},
        {"$project": {"_id": 0, "history.ended": 1, "history.exit_status": 1}},
    ]
    buckets = [
        {"minute": start + timedelta(minutes=i), "finished": 0, "succeeded": 0} for i in range(THROUGHPUT_MINUTES)
    ]
    for row in tasks.aggregate(pipeline):
        index = int(seconds_between(start, row["history"]["ended"]) // 60)
        if 0 <= index < THROUGHPUT_MINUTES:  # an `ended` in the future (clock skew) is left out
            buckets[index]["finished"] += 1
            buckets[index]["succeeded"] += row["history"].get("exit_status") == SUCCESS
    finished = sum(b["finished"] for b in buckets)
    return {
        "since": start,
        "finished": finished,
        "succeeded": sum(b["succeeded"] for b in buckets),
        "per_minute_mean": finished / float(THROUGHPUT_MINUTES),
        "per_minute": buckets,
    }


def worker_load(db):
    """Every known worker with its held tasks and the resources they
    requested against the worker's total, plus a summary over active
    workers. Tasks held under an id no worker document has are listed as
    workers in state `unknown`."""
    held = {}
    # Held tasks are as many as the workers' slots: summed here, in one read.
    for doc in db[TASKS].find(
        {"state": {"$in": [s.value for s in HELD]}, "worker": {"$ne": None}}, {"worker": 1, "requested_resources": 1}
    ):
        row = held.setdefault(doc["worker"], dict({key: 0 for key in RESOURCE_KEYS}, running=0))
        row["running"] += 1
        for key in RESOURCE_KEYS:
            row[key] += (doc.get("requested_resources") or {}).get(key) or 0
    items = []
    projection = {
        "host": 1,
        "state": 1,
        "resources": 1,
        "last_heartbeat": 1,
        "_created": 1,
        "registered": 1,
        "lost": 1,
        "stopped": 1,
    }
    for doc in db[WORKERS].find({}, projection):
        items.append(_worker_item(doc, held.pop(doc["_id"], None)))
    for worker_id, row in held.items():
        items.append(_worker_item({"_id": worker_id, "state": "unknown", "resources": {}}, row))
    order = {WorkerState.ACTIVE: 0, "unknown": 1, WorkerState.LOST: 2, WorkerState.STOPPED: 3}
    items.sort(key=lambda w: (order.get(w["state"], 4), str(w.get("host") or ""), str(w["_id"])))
    summary = {"workers": len(items), "states": {s.value: 0 for s in WORKER_STATES}, "running": 0}
    for key in RESOURCE_KEYS:
        summary[key] = {"used": 0, "total": 0}
    for item in items:
        summary["states"][item["state"]] = summary["states"].get(item["state"], 0) + 1
        summary["running"] += item["running"]
        if item["state"] == WorkerState.ACTIVE:
            for key in RESOURCE_KEYS:
                summary[key]["used"] += item["used"][key]
                summary[key]["total"] += item["resources"].get(key) or 0
    return {"_items": items, "summary": summary}


def _worker_item(doc, row):
    row = row or {}
    total = doc.get("resources") or {}
    used = {key: row.get(key) or 0 for key in RESOURCE_KEYS}
    return {
        "_id": doc["_id"],
        "host": doc.get("host"),
        "state": doc.get("state") or "unknown",
        "last_heartbeat": doc.get("last_heartbeat"),
        "registered": doc.get("registered") or doc.get("_created"),
        # when a lost or stopped registration ended (the dashboard folds them, and hides them after a day)
        "ended": doc.get("lost") or doc.get("stopped"),
        "running": row.get("running", 0),
        "resources": {key: total.get(key) for key in RESOURCE_KEYS},
        "used": used,
        "load": {key: (used[key] / float(total[key]) if total.get(key) else None) for key in RESOURCE_KEYS},
    }


# -- Prometheus ----------------------------------------------------------


class _Snapshot:
    """A prometheus_client collector over figures computed for one scrape
    (nothing is kept between requests, so any server process can answer)."""

    def __init__(self, stats, workers):
        self.stats = stats
        self.workers = workers

    def collect(self):
        stats, workers = self.stats, self.workers
        g = GaugeMetricFamily("banyan_tasks", "Tasks by state.", labels=["state"])
        for state, n in stats["states"].items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("banyan_tasks_finished", "Finished tasks by final exit status.", labels=["exit_status"])
        for status, n in stats["outcomes"].items():
            g.add_metric([status], n)
        yield g
        c = CounterMetricFamily("banyan_attempts_finished", "Finished attempts by exit status.", labels=["exit_status"])
        for status, n in stats["attempts"]["by_exit_status"].items():
            c.add_metric([status], n)
        yield c
        for name, doc, figures in (
            ("banyan_attempt_runtime_seconds", "Runtime of finished attempts.", stats["attempts"]["runtime"]),
            ("banyan_queue_wait_seconds", "Time from a task's creation to its first start.", stats["queue_wait"]),
        ):
            g = GaugeMetricFamily(name, doc, labels=["stat"])
            for key in ("mean", "median", "p95", "max"):
                if figures[key] is not None:
                    g.add_metric([key], figures[key])
            yield g
        yield GaugeMetricFamily(
            "banyan_attempts_finished_last_hour",
            "Attempts that finished in the last 60 minutes.",
            value=stats["throughput"]["finished"],
        )
        g = GaugeMetricFamily("banyan_workers", "Workers by state.", labels=["state"])
        for state, n in workers["summary"]["states"].items():
            g.add_metric([state], n)
        yield g
        running = GaugeMetricFamily("banyan_worker_running_tasks", "Tasks a worker holds.", labels=["worker", "host"])
        used = GaugeMetricFamily(
            "banyan_worker_resources_used",
            "Resources requested by a worker's tasks.",
            labels=["worker", "host", "resource"],
        )
        total = GaugeMetricFamily(
            "banyan_worker_resources_total", "A worker's total resources.", labels=["worker", "host", "resource"]
        )
        for item in workers["_items"]:
            if item["state"] not in (WorkerState.ACTIVE, "unknown"):
                continue
            labels = [str(item["_id"]), item["host"] or ""]
            running.add_metric(labels, item["running"])
            for key in RESOURCE_KEYS:
                used.add_metric(labels + [key], item["used"][key])
                if item["resources"][key] is not None:
                    total.add_metric(labels + [key], item["resources"][key])
        yield running
        yield used
        yield total


def metrics_text(db, query=None, now=None):
    """`/metrics` in Prometheus' text format."""
    return generate_latest(_Snapshot(task_stats(db, query, now), worker_load(db)))


# -- who may see what ----------------------------------------------------

#: Roles that may read statistics (with authentication off, everyone is an admin).
READERS = ("admin", "user", "worker")


def visible_tasks(query=None):
    """`query` restricted to the tasks the caller may see (a user's own;
    see `auth.owner_filter`): the one place statistics apply it."""
    query = dict(query or {})
    own = auth.owner_filter()
    if not own:
        return query
    return {"$and": [query, own]} if query else own


# -- HTTP ----------------------------------------------------------------

blueprint = Blueprint("stats", __name__)


def _db():
    return current_app.data.pymongo(TASKS).db


def _where():
    """`?where=` parsed and checked as Eve does for `GET /tasks`."""
    query = current_app.data.where_filter(TASKS, request.args.get("where"))
    if query:
        _check_filter(query)
    return query


def _check_filter(query):
    """Try `query` on the store once, over every task (a filter may fail on
    one task only), so that a filter it refuses is a 400 and a failure while
    computing is still seen as the bug it would be."""
    try:
        _db()[TASKS].count_documents(query)
    except store.QUERY_ERRORS as e:
        abort(400, description="the store refused the filter in 'where': %s" % e)


def _reader_query():
    return visible_tasks(_where())


def jsonable(value):
    """Stats as JSON: ObjectIds as strings, times in Eve's date format."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "strftime"):
        return date_to_str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@blueprint.route("/stats", methods=["GET"])
@auth.require_role(*READERS)
def get_stats():
    return jsonify(jsonable(task_stats(_db(), _reader_query())))


@blueprint.route("/stats/workers", methods=["GET"])
@auth.require_role(*READERS)
def get_worker_stats():
    return jsonify(jsonable(worker_load(_db())))


@blueprint.route("/metrics", methods=["GET"])
@auth.require_role(*READERS)
def get_metrics():
    body = metrics_text(_db(), _reader_query())
    return Response(body, mimetype=None, content_type=CONTENT_TYPE_LATEST)


@blueprint.route("/dashboard", methods=["GET"])
def get_dashboard():
    """The page itself holds no data, so it is public; every figure on it
    comes from the API with the caller's token."""
    response = send_from_directory(STATIC_DIR, "dashboard.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
