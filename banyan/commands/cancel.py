"""`banyan cancel`: cancel tasks by id or by filter."""

import sys

from banyan.commands.base import (
    EXIT_FAILED,
    EXIT_USAGE,
    CommandError,
    add_command,
    add_job_flag,
    connect,
    job_query,
    label,
    outcome,
    parse_json_arg,
    task_ids,
)
from banyan.errors import describe_result
from banyan.protocol import FINISHED, TaskState

EPILOG = """
A task that has not started is cancelled at once; a running one is stopped
by its worker (SIGTERM, then SIGKILL after its max_shutdown_time) and shows
`pending_cancellation` until then. The tasks that run after a cancelled task
are cancelled too. A task that already finished cannot be cancelled (exit 1).

examples:
  banyan cancel 65f0c2a1e4b0a1b2c3d4e5f6
  banyan cancel --where '{"name": "squares"}'
  banyan cancel --job sweep
  banyan ls --state available --json | jq -r '.[]._id' | banyan cancel -
"""


def register(sub):
    parser = add_command(
        sub,
        "cancel",
        run,
        help="cancel tasks (running ones are stopped)",
        description="Cancel tasks, given by id or by a filter.",
        epilog=EPILOG,
    )
    parser.add_argument("ids", nargs="*", metavar="ID", help="tasks to cancel ('-' reads ids from stdin)")
    parser.add_argument(
        "--where",
        metavar="JSON",
        help='cancel every unfinished task matching this MongoDB filter, e.g. \'{"name": "squares"}\'',
    )
    add_job_flag(parser, help="cancel every unfinished task of this job (its id, or its name)")


def run(args):
    if bool(args.ids) == bool(args.where or args.job):
        raise CommandError("give task IDs, or --where JSON and/or --job JOB (one of them)", EXIT_USAGE)
    client = connect(args)
    projection = {"name": 1, "state": 1, "exit_status": 1, "current_history": 1}
    if args.where or args.job:
        query = job_query(client, args, parse_json_arg(args.where, "--where") if args.where else {})
        query = {"$and": [query, {"state": {"$nin": [s.value for s in FINISHED]}}]}
        tasks = {doc["_id"]: doc for doc in client.iter_tasks(query, projection, max_results=10000)}
        ids = list(tasks)
        if not ids:
            print("no unfinished task matches %s" % (args.where or "--job %s" % args.job), file=sys.stderr)
            return 0
    else:
        ids = task_ids(args.ids)
        tasks = client.tasks_by_id(ids, projection)
    problems = []
    todo = []
    for task_id in ids:
        doc = tasks.get(task_id)
        if doc is None:
            problems.append("%s: no such task (or not yours)" % task_id)
        elif doc["state"] in FINISHED:
            problems.append("%s: already finished: %s" % (label(doc), outcome(doc)))
        elif doc["state"] == TaskState.PENDING_CANCELLATION:
            print("%s: already being stopped" % label(doc))
        else:
            todo.append(task_id)
    accepted = []
    for task_id, result in zip(todo, client.set_states(todo, TaskState.CANCELLED.value)):
        refusal = describe_result(result)
        if refusal:
            problems.append("%s: %s" % (label(tasks[task_id]), refusal))
        else:
            accepted.append(task_id)
    now = client.tasks_by_id(accepted, {"name": 1, "state": 1}) if accepted else {}
    for task_id in accepted:
        doc = now.get(task_id, tasks[task_id])
        if doc.get("state") == TaskState.PENDING_CANCELLATION:
            print("%s: stopping (its worker was asked to stop it)" % label(doc))
        else:
            print("%s: cancelled" % label(doc))
    for problem in problems:
        print("banyan cancel: %s" % problem, file=sys.stderr)
    return EXIT_FAILED if problems else 0
