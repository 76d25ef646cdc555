"""`banyan jobs`: one line per job (a submission) with the counts of its tasks."""

import sys

from banyan.commands.base import (EXIT_USAGE, CommandError, add_command, connect, format_time, print_json,
                                  print_table, shorten)

EPILOG = """
Every `banyan submit` (one task, an array, a graph file) is a job. STATUS is
running (some run), queued (none runs, some wait), succeeded (all did) or
failed (all finished, some did not succeed). The other commands take a job
by id or by name: `banyan ls --job NAME`, `banyan wait --job ID`,
`banyan retry --job ID --failed`, `banyan hold --job ID`.

examples:
  banyan jobs
  banyan jobs --last 5
  banyan jobs --json
"""

COLUMNS = ("ID", "NAME", "STATUS", "TOTAL", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "LIMIT",
           "CREATED")


def register(sub):
    parser = add_command(sub, "jobs", run, help="list jobs with the counts of their tasks",
                         description="List jobs, oldest first: one line per submission with how many of "
                                     "its tasks are queued, running, succeeded, failed and cancelled.",
                         epilog=EPILOG)
    parser.add_argument("--name", help="only jobs of this name")
    parser.add_argument("--last", type=int, metavar="N", help="only the N newest")
    parser.add_argument("--json", action="store_true", help="print the jobs as the API returns them")


def run(args):
    if args.last is not None and args.last < 1:
        raise CommandError("--last must be at least 1", EXIT_USAGE)
    client = connect(args)
    where = {"name": args.name} if args.name else None
    jobs = list(client.iter_jobs(where))
    if args.last:
        jobs = jobs[-args.last:]
    if args.json:
        for job in jobs:
            job.pop("_links", None)
        print_json(jobs)
        return 0
    rows = []
    for job in jobs:
        counts = job.get("counts") or {}
        rows.append([job["_id"], shorten(job.get("name") or "", 32), job.get("status") or "",
                     counts.get("total", 0), counts.get("queued", 0), counts.get("running", 0),
                     counts.get("succeeded", 0), counts.get("failed", 0), counts.get("cancelled", 0),
                     job.get("array_limit") or "", format_time(job.get("_created"))])
    if rows:
        print_table(COLUMNS, rows)
    else:
        print("no jobs", file=sys.stderr)
    return 0
