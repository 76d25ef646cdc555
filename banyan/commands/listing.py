"""`banyan ls` (a table of tasks) and `banyan show` (one task and its attempts)."""

import sys
from datetime import datetime, timedelta, timezone

from banyan.commands.base import (
    EXIT_USAGE,
    CommandError,
    add_command,
    add_job_flag,
    attempt_runtime,
    cancel_text,
    connect,
    format_bytes,
    format_duration,
    format_number,
    format_time,
    job_query,
    outcome,
    parse_json_arg,
    print_json,
    print_table,
    reason_text,
    shorten,
    task_ids,
)
from banyan.protocol import FINISHED, TaskState
from banyan.units import parse_duration

STATES = tuple(s.value for s in TaskState)
#: What `ls` reads of each task for its table.
LS_PROJECTION = {
    "name": 1,
    "state": 1,
    "exit_status": 1,
    "owner": 1,
    "requested_resources": 1,
    "priority": 1,
    "environment": 1,
    "pending_dependency_count": 1,
    "_created": 1,
    "current_history": 1,
    "pending_parents": 1,
    "held": 1,
    "job": 1,
    "array_limit": 1,
}

LS_EPILOG = """
STATE is the task's state (`waiting` while it waits for parents, `held`
while held); for a finished task, how it ended. An array task shows its
index after its name (NAME[7]). CODE, HOST, RUNTIME and ENDED are those of
its latest attempt (like sacct). WAITS counts the tasks it still runs after;
REASON says why a task that is not running waits (as `banyan show` does).
--json prints the tasks as the API returns them; --format id,state,...
prints the fields given, tab-separated and without a header, for scripts
(fields: %s).

examples:
  banyan ls
  banyan ls --job sweep --state running --state available
  banyan ls --since 2h --state finished
  banyan ls --name squares --json
  banyan ls --job sweep --format id,state,exit_code,runtime
  banyan ls --where '{"priority": {"$gt": 0}}' --last 20
"""

SHOW_EPILOG = """
examples:
  banyan show 65f0c2a1e4b0a1b2c3d4e5f6
  banyan show --json 65f0c2a1e4b0a1b2c3d4e5f6
"""


def register(sub):
    ls = add_command(
        sub,
        "ls",
        run_ls,
        help="list tasks (a table, or --json)",
        description="List tasks, oldest first: id, name, state or outcome, attempts, "
        "resources, owner and creation time. Filters combine with AND.",
        epilog=LS_EPILOG,
    )
    ls.add_argument(
        "--state",
        action="append",
        default=[],
        choices=STATES + ("finished", "unfinished"),
        metavar="STATE",
        help="only tasks in this state (repeatable): %s, or finished / unfinished" % ", ".join(STATES),
    )
    ls.add_argument("--name", action="append", default=[], help="only tasks of this name (repeatable)")
    ls.add_argument("--owner", help="only tasks of this owner (users see only their own anyway)")
    ls.add_argument("--where", metavar="JSON", help="a MongoDB filter on the tasks' fields")
    add_job_flag(ls)
    ls.add_argument(
        "--since",
        metavar="WHEN",
        help="only tasks created since WHEN: a duration ago (90s, 30m, 2h, 1d) or a date "
        "(2026-12-01 or 2026-12-01T10:00)",
    )
    ls.add_argument(
        "--format",
        metavar="FIELDS",
        help="comma-separated fields, printed tab-separated without a header (for scripts)",
    )
    ls.add_argument("--last", type=int, metavar="N", help="only the N newest of them")
    ls.add_argument("--json", action="store_true", help="print the tasks as JSON (all their fields)")
    ls.add_argument(
        "--archive",
        nargs="?",
        const="~/.banyan",
        metavar="DATA_DIR",
        help="list the archived tasks of an embedded store (`banyan store archive`) instead "
        "of the server's (default data directory: ~/.banyan)",
    )

    show = add_command(
        sub,
        "show",
        run_show,
        help="show a task: its fields and attempts",
        description="Show one or more tasks in full: command, resources, state, "
        "continuations, and each attempt (worker, times, exit code, "
        "usage, progress).",
        epilog=SHOW_EPILOG,
    )
    show.add_argument("ids", nargs="+", metavar="ID", help="task ids ('-' reads them from stdin)")
    show.add_argument("--json", action="store_true", help="print the tasks as the API returns them")


def ls_query(args):
    query = parse_json_arg(args.where, "--where") if args.where else {}
    states = []
    for state in args.state:
        if state == "finished":
            states += [s.value for s in FINISHED]
        elif state == "unfinished":
            states += [s for s in STATES if s not in FINISHED]
        else:
            states.append(state)
    if states:
        states = list(dict.fromkeys(states))
        query["state"] = states[0] if len(states) == 1 else {"$in": states}
    if args.name:
        query["name"] = args.name[0] if len(args.name) == 1 else {"$in": args.name}
    if args.owner:
        query["owner"] = args.owner
    return query


def parse_since(value, now=None):
    """--since: a duration ago, or a date (local time when it has no zone)."""
    now = now or datetime.now(timezone.utc)
    try:
        return now - timedelta(seconds=parse_duration(value))
    except (ValueError, OverflowError):
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(
            "--since %r: give a duration (30m, 2h, 1d) or a date (2026-12-01T10:00)" % value, EXIT_USAGE
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.astimezone(timezone.utc)


def _latest(doc):
    return doc.get("current_history") or ((doc.get("history") or [None])[-1]) or {}


def _index_name(doc):
    name = doc.get("name") or ""
    index = (doc.get("environment") or {}).get("BANYAN_ARRAY_INDEX")
    return "%s[%s]" % (name, index) if index is not None else name


#: `ls --format` fields: name -> the text of a task's cell.
FORMAT_FIELDS = {
    "id": lambda d: d["_id"],
    "name": _index_name,
    "state": outcome,
    "raw_state": lambda d: d.get("state") or "",
    "exit_status": lambda d: d.get("exit_status") or "",
    "exit_code": lambda d: "" if _latest(d).get("exit_code") is None else str(_latest(d)["exit_code"]),
    "attempts": lambda d: str(_latest(d).get("attempt") or 0),
    "host": lambda d: _latest(d).get("host") or "",
    "runtime": lambda d: format_duration(attempt_runtime(_latest(d))) if _latest(d) else "",
    "started": lambda d: format_time(_latest(d).get("started")),
    "ended": lambda d: format_time(_latest(d).get("ended")),
    "waits": lambda d: str(d.get("pending_dependency_count") or ""),
    "cores": lambda d: format_number((d.get("requested_resources") or {}).get("cores")),
    "memory": lambda d: format_bytes((d.get("requested_resources") or {}).get("memory") or 0),
    "gpus": lambda d: str((d.get("requested_resources") or {}).get("gpus") or 0),
    "priority": lambda d: str(d.get("priority", "")),
    "owner": lambda d: d.get("owner") or "",
    "job": lambda d: d.get("job") or "",
    "created": lambda d: format_time(d.get("_created")),
    "reason": lambda d: reason_text(d) or cancel_text(d),
}
LS_EPILOG = LS_EPILOG % ", ".join(FORMAT_FIELDS)


def run_ls(args):
    if args.last is not None and args.last < 1:
        raise CommandError("--last must be at least 1", EXIT_USAGE)
    fields = None
    if args.format:
        fields = [f.strip().lower() for f in args.format.split(",") if f.strip()]
        unknown = [f for f in fields if f not in FORMAT_FIELDS]
        if unknown or not fields:
            raise CommandError(
                "--format: unknown field%s %s (known: %s)"
                % ("s" if len(unknown) > 1 else "", ", ".join(unknown) or "(none given)", ", ".join(FORMAT_FIELDS)),
                EXIT_USAGE,
            )
    query = ls_query(args)
    if args.since:
        since = parse_since(args.since)
        query["_created"] = {"$gte": since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    if args.archive:
        tasks = _archived(args, query)
    else:
        tasks = _served(args, query, fields)
    if args.json:
        for doc in tasks:
            doc.pop("_links", None)
        print_json(tasks)
        return 0
    if fields:
        for doc in tasks:
            sys.stdout.write("\t".join(FORMAT_FIELDS[f](doc) for f in fields) + "\n")
        return 0
    rows = []
    for doc in tasks:
        resources = doc.get("requested_resources") or {}
        attempt = _latest(doc)
        code = attempt.get("exit_code")
        rows.append(
            [
                doc["_id"],
                shorten(_index_name(doc), 32),
                outcome(doc),
                "" if code is None else code,
                attempt.get("attempt") or 0,
                doc.get("pending_dependency_count") or "",
                format_number(resources.get("cores")),
                format_bytes(resources.get("memory")) if resources.get("memory") else "",
                resources.get("gpus") or "",
                attempt.get("host") or "",
                format_duration(attempt_runtime(attempt)) if attempt else "",
                doc.get("owner") or "",
                format_time(doc.get("_created")),
                format_time(attempt.get("ended")),
                shorten(reason_text(doc), 60),
            ]
        )
    if rows:
        print_table(
            (
                "ID",
                "NAME",
                "STATE",
                "CODE",
                "ATTEMPTS",
                "WAITS",
                "CORES",
                "MEMORY",
                "GPUS",
                "HOST",
                "RUNTIME",
                "OWNER",
                "CREATED",
                "ENDED",
                "REASON",
            ),
            rows,
        )
    else:
        print("no tasks", file=sys.stderr)
    return 0


def _served(args, query, fields):
    """The server's tasks matching `query`, oldest first (`--last`: the newest N)."""
    client = connect(args)
    query = job_query(client, args, query)
    projection = None if args.json else dict(LS_PROJECTION, cancelled_by=1) if fields else LS_PROJECTION
    if args.last:
        reply = client.list_tasks(query, projection, sort="-_id", max_results=args.last)
        return list(reversed(reply.get("_items", [])))
    return list(client.iter_tasks(query, projection, sort="_id", max_results=10000))


def _archived(args, query):
    """The archived tasks matching `query`, oldest first (`--last`: the newest N)."""
    import os

    from mongomock.filtering import filter_applies

    from banyan.store import archive

    if args.job:
        raise CommandError("--job cannot be used with --archive", EXIT_USAGE)
    data_dir = os.path.expanduser(args.archive)
    if not os.path.isdir(data_dir):
        raise CommandError("--archive: no data directory at %s" % data_dir, EXIT_USAGE)
    tasks = sorted((doc for doc in archive.read(data_dir) if filter_applies(query, doc)), key=lambda d: d["_id"])
    return tasks[-args.last :] if args.last else tasks


def run_show(args):
    ids = task_ids(args.ids)
    client = connect(args)
    found = client.tasks_by_id(ids)
    missing = [task_id for task_id in ids if task_id not in found]
    if args.json:
        docs = [found[task_id] for task_id in ids if task_id in found]
        for doc in docs:
            doc.pop("_links", None)
        print_json(docs[0] if len(ids) == 1 and docs else docs)
    else:
        for n, task_id in enumerate(task_id for task_id in ids if task_id in found):
            if n:
                print()
            show_task(found[task_id])
    if missing:
        raise CommandError("no such task (or not yours): %s" % ", ".join(missing))
    return 0


def show_task(doc, out=None):
    out = out or sys.stdout
    resources = doc.get("requested_resources") or {}
    command = doc.get("command")
    if isinstance(command, list):
        import shlex

        command = " ".join(shlex.quote(word) for word in command) + "   (executed directly)"
    elif command is None:
        command = "(none: a barrier)"
    fields = [
        ("id", doc["_id"]),
        ("name", doc.get("name") or ""),
        ("state", doc.get("state")),
        ("outcome", outcome(doc) if doc.get("state") in FINISHED else ""),
        ("command", command),
        (
            "resources",
            "cores %s, memory %s, gpus %s"
            % (
                format_number(resources.get("cores", 1)),
                format_bytes(resources.get("memory") or 0),
                resources.get("gpus") or 0,
            ),
        ),
        ("priority", doc.get("priority", 0)),
        ("retries", "%s of %s" % (doc.get("retry_count") or 0, doc.get("max_retries") or 0)),
        ("time limit", format_duration(doc.get("time_limit")) if doc.get("time_limit") else "none"),
        ("working dir", doc.get("working_directory") or ""),
        ("environment", " ".join("%s=%s" % item for item in sorted((doc.get("environment") or {}).items()))),
        ("owner", doc.get("owner") or ""),
        ("worker", doc.get("worker") or ""),
        ("job", doc.get("job") or ""),
        ("held", "yes (banyan release lets it run)" if doc.get("held") else ""),
        ("why waiting", reason_text(doc)),
        ("cancelled", cancel_text(doc)),
        ("continuations", " ".join(doc.get("continuations") or [])),
        ("after", " ".join(doc.get("after") or [])),
        ("after any", " ".join(doc.get("after_any") or [])),
        ("after failure", " ".join(doc.get("after_failure") or [])),
        ("waits for", " ".join(doc.get("pending_parents") or [])),
        ("created", format_time(doc.get("_created"))),
        ("updated", format_time(doc.get("_updated"))),
    ]
    for key, value in fields:
        if value in ("", None) and key not in ("name", "state"):
            continue
        out.write("%-14s %s\n" % (key + ":", value))
    history = doc.get("history") or []
    if not history:
        if doc.get("state") in FINISHED:
            out.write(
                "attempts:      none (it %s without running)\n"
                % ("was cancelled" if doc.get("state") == TaskState.CANCELLED else "finished")
            )
        else:
            out.write("attempts:      none yet\n")
        return
    out.write("attempts:\n")
    rows = []
    for attempt in history:
        usage = attempt.get("usage") or {}
        progress = attempt.get("progress") or {}
        progress_text = ""
        if progress:
            progress_text = "%d%%" % round(100 * float(progress.get("fraction") or 0))
            if progress.get("message"):
                progress_text += " " + shorten(progress["message"], 40)
        code = attempt.get("exit_code")
        rows.append(
            [
                attempt.get("attempt"),
                attempt.get("worker") or "",
                attempt.get("host") or "",
                format_time(attempt.get("started")),
                format_time(attempt.get("ended")),
                format_duration(attempt_runtime(attempt)),
                attempt.get("exit_status") or "running",
                "" if code is None else code,
                format_bytes(usage.get("max_rss")),
                progress_text,
            ]
        )
    print_table(
        ("#", "WORKER", "HOST", "STARTED", "ENDED", "RUNTIME", "EXIT", "CODE", "MAX RSS", "PROGRESS"),
        rows,
        out=out,
        indent="  ",
    )
