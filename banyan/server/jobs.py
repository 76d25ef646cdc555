"""Jobs: one per submission (a task, an array, a graph), with counts of its tasks.

A job is a stored document (`/jobs`, an Eve resource); its tasks name it in
`job`. What a job shows beyond its own fields is computed when it is read:
`counts` of its tasks by what a person asks of them (queued, running,
succeeded, failed, cancelled), one aggregation for all the jobs of a page,
`status`, the job's state in one word, and `slots`, the tasks holding one of
its `array_limit` run slots.
"""

from banyan.protocol import HELD, QUEUED, Outcome, TaskState

CATEGORIES = ("queued", "running", "succeeded", "failed", "cancelled")


def category(state, exit_status):
    """Where a task of `state` and `exit_status` counts."""
    if state in QUEUED:
        return "queued"
    if state in HELD:
        return "running"
    if state == TaskState.CANCELLED:
        return "cancelled"
    return "succeeded" if exit_status == Outcome.SUCCESS else "failed"


def job_status(counts):
    """'running', 'queued', 'succeeded', 'failed' (some did not succeed) or 'empty'."""
    if counts["running"]:
        return "running"
    if counts["queued"]:
        return "queued"
    if not counts["total"]:
        return "empty"
    return "succeeded" if counts["succeeded"] == counts["total"] else "failed"


def add_counts(db, jobs):
    """Set `counts` and `status` on each job of `jobs` (one aggregation)."""
    jobs = [job for job in jobs if isinstance(job, dict) and "_id" in job]
    if not jobs:
        return
    counts = {job["_id"]: dict.fromkeys(CATEGORIES + ("total",), 0) for job in jobs}
    pipeline = [
        {"$match": {"job": {"$in": list(counts)}}},
        {"$group": {"_id": {"job": "$job", "state": "$state", "exit_status": "$exit_status"}, "n": {"$sum": 1}}},
    ]
    for row in db["tasks"].aggregate(pipeline):
        key = row["_id"]
        entry = counts.get(key.get("job"))
        if entry is not None:
            entry[category(key.get("state"), key.get("exit_status"))] += row["n"]
            entry["total"] += row["n"]
    slots = {job_id: [] for job_id in counts}
    for slot in db["slots"].find({"job": {"$in": list(counts)}}, {"job": 1, "task": 1}):
        slots[slot["job"]].append(slot["task"])
    for job in jobs:
        job["counts"] = counts[job["_id"]]
        job["status"] = job_status(job["counts"])
        job["slots"] = slots[job["_id"]]
