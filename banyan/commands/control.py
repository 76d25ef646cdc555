"""`banyan retry`, `banyan hold`, `banyan release`: act on tasks chosen by
id, by job or by filter."""

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
from banyan.protocol import FINISHED, QUEUED, Outcome

#: Exit statuses of tasks that ran and did not succeed (`retry --failed`).
FAILED = tuple(o.value for o in (Outcome.FAILURE, Outcome.TIMEOUT, Outcome.ABANDONED))
PROJECTION = {"name": 1, "state": 1, "exit_status": 1, "held": 1, "cancelled_by": 1, "current_history": 1}

RETRY_EPILOG = """
A retried task goes back to the queue; its next run is a new attempt (its
earlier attempts stay in `banyan show`). The tasks that were cancelled
because of it (they ran only after its success, say) come back with it, so
the graph can finish. Tasks that succeeded are never retried.

examples:
  banyan retry 65f0c2a1e4b0a1b2c3d4e5f6
  banyan retry --job sweep --failed          # the failed points and what waited on them
  banyan retry --where '{"name": "step"}'
"""

HOLD_EPILOG = """
A held task stays queued but is never started, until it is released. Only
queued tasks (not running, not finished) can be held.

examples:
  banyan hold --job sweep
  banyan release --job sweep
  banyan hold 65f0c2a1e4b0a1b2c3d4e5f6
"""


def _selection_flags(parser, verb):
    parser.add_argument("ids", nargs="*", metavar="ID", help="tasks to %s ('-' reads ids from stdin)" % verb)
    add_job_flag(parser, help="the tasks of this job (its id, or its name)")
    parser.add_argument("--where", metavar="JSON", help="the tasks matching this MongoDB filter")


def register(sub):
    retry = add_command(
        sub,
        "retry",
        run_retry,
        help="run failed or cancelled tasks again",
        description="Put failed, timed-out and cancelled tasks back in the queue as new "
        "attempts, with the tasks that were cancelled because of them.",
        epilog=RETRY_EPILOG,
    )
    _selection_flags(retry, "retry")
    retry.add_argument(
        "--failed",
        action="store_true",
        help="only tasks that ran and failed (failure, timeout, abandoned); those cancelled "
        "because of them come back with them",
    )
    hold = add_command(
        sub,
        "hold",
        run_hold,
        help="keep queued tasks from starting",
        description="Hold queued tasks: they are not started until released.",
        epilog=HOLD_EPILOG,
    )
    _selection_flags(hold, "hold")
    release = add_command(
        sub,
        "release",
        run_release,
        help="let held tasks start",
        description="Release held tasks: they may start again.",
        epilog=HOLD_EPILOG,
    )
    _selection_flags(release, "release")


def choose(client, args, query_filter):
    """The tasks the arguments name: {id: task}, in order. Ids are taken as
    given; --job and --where are narrowed by `query_filter`."""
    if args.ids and (args.job or args.where):
        raise CommandError("give task IDs, or --job / --where, not both", EXIT_USAGE)
    if args.ids:
        ids = task_ids(args.ids)
        found = client.tasks_by_id(ids, PROJECTION)
        missing = [task_id for task_id in ids if task_id not in found]
        if missing:
            raise CommandError("no such task (or not yours): %s" % ", ".join(missing))
        return {task_id: found[task_id] for task_id in ids}
    if not (args.job or args.where):
        raise CommandError("which tasks? give their IDs, --job JOB or --where JSON", EXIT_USAGE)
    query = parse_json_arg(args.where, "--where") if args.where else {}
    query = job_query(client, args, query)
    query = {"$and": [query, query_filter]}
    return {doc["_id"]: doc for doc in client.iter_tasks(query, PROJECTION, sort="_id", max_results=10000)}


def _report(verb, tasks, results, done_text):
    problems = 0
    for task_id, result in zip(tasks, results):
        refusal = describe_result(result)
        if refusal:
            problems += 1
            print("banyan %s: %s: %s" % (verb, label(tasks[task_id]), refusal), file=sys.stderr)
        else:
            print("%s: %s" % (label(tasks[task_id]), done_text))
    return EXIT_FAILED if problems else 0


def run_retry(args):
    client = connect(args)
    wanted = {"state": {"$in": list(FINISHED)}, "exit_status": {"$ne": Outcome.SUCCESS}}
    if args.failed:
        wanted = {"exit_status": {"$in": list(FAILED)}, "state": {"$in": list(FINISHED)}}
    tasks = choose(client, args, wanted)
    if args.ids and args.failed:
        tasks = {k: v for k, v in tasks.items() if v.get("exit_status") in FAILED}
    if not tasks:
        print("nothing to retry", file=sys.stderr)
        return 0
    # The tasks that failed by themselves first: those cancelled because of
    # them come back with them.
    order = sorted(tasks, key=lambda task_id: bool(tasks[task_id].get("cancelled_by")))
    tasks = {task_id: tasks[task_id] for task_id in order}
    results = client.retry(list(tasks))
    code = _report("retry", tasks, results, "queued again")
    revived = len([r for r in results if r.get("_status") == "OK"])
    print(
        "%d task%s queued again (with the tasks cancelled because of them)" % (revived, "" if revived == 1 else "s"),
        file=sys.stderr,
    )
    return code


def _hold(args, held):
    client = connect(args)
    queued = {"state": {"$in": list(QUEUED)}, "held": not held}
    tasks = choose(client, args, queued)
    if args.ids:
        finished = [task_id for task_id, doc in tasks.items() if doc["state"] not in QUEUED]
        for task_id in finished:
            print(
                "banyan %s: %s: is %s; only queued tasks are held or released"
                % ("hold" if held else "release", label(tasks[task_id]), outcome(tasks[task_id])),
                file=sys.stderr,
            )
        tasks = {k: v for k, v in tasks.items() if k not in finished}
        if finished and not tasks:
            return EXIT_FAILED
    if not tasks:
        print("no queued task to %s" % ("hold" if held else "release"), file=sys.stderr)
        return 0
    results = client.hold(list(tasks), held)
    return _report("hold" if held else "release", tasks, results, "held" if held else "released")


def run_hold(args):
    return _hold(args, True)


def run_release(args):
    return _hold(args, False)
