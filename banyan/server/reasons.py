"""Why a task is not running: the `pending_reason` added to tasks as they are read.

Computed when read, never stored: it depends on the live workers and on the
job's run slots, which change without the task changing. Each reason is
`{"code": ..., "message": ...}` plus details; tasks that run or have
finished have none (null). Codes, in the order they are checked:

- `inactive`: not queued (PATCH `{"state": "available"}` queues it);
- `waiting_for_parents`: `parents` lists the parents it still waits for;
- `held`: held by a user (`banyan release`);
- `no_worker_fits`: no live worker could ever run it: `asks` (its request)
  and `largest` (the most any live worker offers of each resource);
- `array_limit`: its job already runs `array_limit` tasks at once;
- `workers_busy`: live workers could run it, but none has room now.
"""

from banyan.fit import describe_request, fits, largest_offers, short_of
from banyan.protocol import QUEUED
from banyan.protocol import TaskState as S

#: Task fields a reason is computed from (added to projections that ask for it).
NEEDS = ("state", "pending_parents", "held", "requested_resources", "job", "array_limit")


def add_pending_reasons(db, docs, workers):
    """Set `pending_reason` on each task of `docs` that has a state (as read
    with its projection): what the live workers offer (`workers`, the
    registry, which keeps it for a second) and one query for the jobs,
    whatever the number of tasks, and neither when every task's reason is
    its own (inactive, waiting for parents, held). With hundreds of workers,
    reading them made a user's `GET /tasks/<id>` six times as costly, and
    under load it queued for the store once per slice of them."""
    docs = [doc for doc in docs if isinstance(doc, dict) and "state" in doc]
    for doc in docs:
        doc["pending_reason"] = None
    # (a projection without the fields a reason needs gets none)
    queued = [
        doc
        for doc in docs
        if doc["state"] in [s.value for s in QUEUED] and "pending_parents" in doc and "requested_resources" in doc
    ]
    for doc in queued:
        doc["pending_reason"] = own_reason(doc)
    queued = [doc for doc in queued if doc["pending_reason"] is None]
    if not queued:
        return
    offers = workers.active_offers()
    job_ids = list({doc["job"] for doc in queued if doc.get("array_limit") and doc.get("job")})
    slots = {}
    if job_ids:
        for slot in db["slots"].find({"job": {"$in": job_ids}}, {"job": 1}):
            slots[slot["job"]] = slots.get(slot["job"], 0) + 1
    largest = largest_offers(offers)
    for doc in queued:
        doc["pending_reason"] = pending_reason(doc, offers, largest, slots)


def own_reason(doc):
    """The reason a task is not running that depends on the task alone
    (inactive, waiting for parents, held), or None."""
    parents = doc.get("pending_parents") or []
    if doc.get("state") == S.INACTIVE and not parents:
        return {
            "code": "inactive",
            "message": 'inactive: not queued until it is made available (PATCH {"state": "available"})',
        }
    if parents:
        return {
            "code": "waiting_for_parents",
            "parents": parents,
            "message": "waiting for %d parent%s to finish: %s"
            % (
                len(parents),
                "" if len(parents) == 1 else "s",
                ", ".join(str(p) for p in parents[:5]) + (" ..." if len(parents) > 5 else ""),
            ),
        }
    if doc.get("held"):
        return {"code": "held", "message": "held: it will not run until it is released (banyan release)"}
    return None


def pending_reason(doc, workers, largest, slots):
    """Why a ready task waits, given what the live `workers` offer
    (`[{"resources": ...}]`) and the jobs' taken `slots`."""
    own = own_reason(doc)
    if own is not None:
        return own
    asks = dict(doc.get("requested_resources") or {})
    if not any(fits(asks, w.get("resources") or {}) for w in workers):
        if not workers:
            message = "no live worker: start one (banyan-worker) for it to run"
        else:
            short = short_of(asks, largest)
            message = "no live worker could ever fit it: it asks %s; the largest a worker offers: %s" % (
                describe_request(asks, short),
                describe_request(largest, short),
            )
        return {"code": "no_worker_fits", "asks": asks, "largest": largest, "message": message}
    limit = doc.get("array_limit")
    if limit and slots.get(doc.get("job"), 0) >= limit:
        return {"code": "array_limit", "message": "array limit reached: its job runs at most %d at once" % limit}
    return {"code": "workers_busy", "message": "waiting for a worker: the workers that fit it are busy"}
