"""`banyan jobs`: one line per job (a submission) with the counts of its tasks."""

import sys

from banyan.commands.base import (
    EXIT_USAGE,
    CommandError,
    add_command,
    connect,
    format_time,
    print_json,
    print_table,
    resolve_job,
    shorten,
)
from banyan.protocol import TaskState

EPILOG = """
Every `banyan submit` (one task, an array, a graph file) is a job. STATUS is
running (some run), queued (none runs, some wait), succeeded (all did) or
failed (all finished, some did not succeed). The other commands take a job
by id or by name: `banyan ls --job NAME`, `banyan wait --job ID`,
`banyan retry --job ID --failed`, `banyan hold --job ID`.

`banyan jobs JOB` prints the job's tasks as the graph grew: each task a
running task added (`banyan submit --child`) is indented under it, with
the attempt that added it; "superseded" marks those of an attempt that
failed (its retry added new ones in their place).

examples:
  banyan jobs
  banyan jobs sweep            # its tasks, and which task added which
  banyan jobs --last 5
  banyan jobs --json
"""

COLUMNS = ("ID", "NAME", "STATUS", "TOTAL", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "LIMIT", "CREATED")


def register(sub):
    parser = add_command(
        sub,
        "jobs",
        run,
        help="list jobs with the counts of their tasks",
        description="List jobs, oldest first: one line per submission with how many of "
        "its tasks are queued, running, succeeded, failed and cancelled.",
        epilog=EPILOG,
    )
    parser.add_argument(
        "job", nargs="?", metavar="JOB", help="show this job's tasks (id or name), each under the task that added it"
    )
    parser.add_argument("--name", help="only jobs of this name")
    parser.add_argument("--last", type=int, metavar="N", help="only the N newest")
    parser.add_argument("--json", action="store_true", help="print the jobs as the API returns them")


def run(args):
    if args.last is not None and args.last < 1:
        raise CommandError("--last must be at least 1", EXIT_USAGE)
    client = connect(args)
    if args.job:
        return show_tree(client, resolve_job(client, args.job), args.json)
    where = {"name": args.name} if args.name else None
    jobs = list(client.iter_jobs(where))
    if args.last:
        jobs = jobs[-args.last :]
    if args.json:
        for job in jobs:
            job.pop("_links", None)
        print_json(jobs)
        return 0
    rows = []
    for job in jobs:
        counts = job.get("counts") or {}
        rows.append(
            [
                job["_id"],
                shorten(job.get("name") or "", 32),
                job.get("status") or "",
                counts.get("total", 0),
                counts.get("queued", 0),
                counts.get("running", 0),
                counts.get("succeeded", 0),
                counts.get("failed", 0),
                counts.get("cancelled", 0),
                job.get("array_limit") or "",
                format_time(job.get("_created")),
            ]
        )
    if rows:
        print_table(COLUMNS, rows)
    else:
        print("no jobs", file=sys.stderr)
    return 0


TREE_FIELDS = {
    "name": 1,
    "state": 1,
    "exit_status": 1,
    "added_by": 1,
    "added_in_attempt": 1,
    "superseded": 1,
    "depth": 1,
}


def show_tree(client, job, as_json=False):
    """The tasks of `job`, each under the task that added it (oldest first)."""
    tasks = list(client.iter_tasks({"job": job}, TREE_FIELDS, sort="_id", max_results=1000))
    if as_json:
        for task in tasks:
            task.pop("_links", None)
        print_json(tasks)
        return 0
    ids = {task["_id"] for task in tasks}
    children = {}
    for task in tasks:
        parent = task.get("added_by") if task.get("added_by") in ids else None
        children.setdefault(parent, []).append(task)
    rows = []

    def walk(parent, indent):
        for task in children.get(parent, []):
            state = task.get("state") or ""
            if state == TaskState.TERMINATED:
                state = task.get("exit_status") or state
            how = ""
            if task.get("added_by"):
                how = "added by attempt %s" % task.get("added_in_attempt")
                if task.get("superseded"):
                    how += ", superseded"
            rows.append([task["_id"], "  " * indent + shorten(task.get("name") or "", 40), state, how])
            walk(task["_id"], indent + 1)

    walk(None, 0)
    if rows:
        print_table(("ID", "TASK", "STATE", "ADDED"), rows)
    else:
        print("job %s has no tasks" % job, file=sys.stderr)
    return 0
