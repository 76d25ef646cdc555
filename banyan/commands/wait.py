"""`banyan wait`: block until tasks finish, with a progress bar; fail if any failed."""

import sys
import time

from banyan.commands.base import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CommandError,
    add_command,
    add_job_flag,
    connect,
    format_duration,
    job_query,
    label,
    outcome,
    parse_json_arg,
    reason_text,
    task_ids,
)

EPILOG = """
The tasks are those given (or matching the filters) when wait starts; with
--job, also those the job's tasks add while they run (submit --child). wait
exits 0 when all of them succeeded, and 1 when any failed, timed out, was
abandoned or was cancelled; it then names each of them on stderr, with the
reason (a task cancelled because of a parent names the parent and how it
ended). When --timeout runs out, it says why each unfinished task is not
running (waiting for parents, held, no worker could ever fit it...).

examples:
  banyan wait 65f0c2a1e4b0a1b2c3d4e5f6 65f0c2a1e4b0a1b2c3d4e5f7
  banyan submit --array 1-100 -- ./step.sh | banyan wait -
  banyan wait --name squares
  banyan wait --job sweep
  banyan wait --all --timeout 1h
"""

#: Failed tasks named one per line, at most this many.
MAX_NAMED = 50


def register(sub):
    parser = add_command(
        sub,
        "wait",
        run,
        help="wait for tasks to finish (exit 1 if any failed)",
        description="Wait until tasks have finished, showing progress on stderr, and exit "
        "non-zero if any of them did not succeed, naming those.",
        epilog=EPILOG,
    )
    parser.add_argument("ids", nargs="*", metavar="ID", help="tasks to wait for ('-' reads ids from stdin)")
    which = parser.add_argument_group("which tasks, instead of IDs")
    which.add_argument("--all", action="store_true", help="every task you can see")
    which.add_argument("--name", action="append", default=[], help="tasks of this name (repeatable)")
    which.add_argument("--owner", help="tasks of this owner")
    which.add_argument("--where", metavar="JSON", help="a MongoDB filter, e.g. '{\"priority\": 5}'")
    add_job_flag(which, help="the tasks of this job (its id, or its name)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit code 4)")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the progress is redrawn (default 1); the wait itself ends the moment the last task does",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    return parser


def selection(args):
    """(ids, where) from the arguments: exactly one of them is not None."""
    query = {}
    if args.where:
        query.update(parse_json_arg(args.where, "--where"))
    if args.name:
        query["name"] = args.name[0] if len(args.name) == 1 else {"$in": args.name}
    if args.owner:
        query["owner"] = args.owner
    if args.ids:
        if query or args.all or args.job:
            raise CommandError(
                "give task IDs or a filter (--all, --job, --name, --owner, --where), not both", EXIT_USAGE
            )
        return task_ids(args.ids), None
    if not query and not args.all and not args.job:
        raise CommandError(
            "which tasks? give their IDs ('-' reads them from stdin), --name NAME, --where JSON or --all", EXIT_USAGE
        )
    return None, query


def run(args):
    if args.interval <= 0:
        raise CommandError("--interval must be > 0", EXIT_USAGE)
    ids, where = selection(args)
    client = connect(args)
    if where is not None:
        where = job_query(client, args, where)
    return wait_and_report(client, ids, where, quiet=args.quiet, timeout=args.timeout, interval=args.interval)


def wait_and_report(client, ids=None, where=None, quiet=False, timeout=None, interval=1.0):
    """Wait (drawing progress unless `quiet`), report on stderr, return the exit code."""
    from banyan.waiting import MissingTasks, wait_for

    bar = ProgressBar(sys.stderr, enabled=not quiet)
    try:
        result = wait_for(client, ids, where, interval=interval, timeout=timeout, on_progress=bar.update)
    except MissingTasks as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    finally:
        bar.close()
    failed = result.failed
    total = len(result.tasks)
    if failed:
        print(
            "banyan wait: %d of %d task%s did not succeed:" % (len(failed), total, "" if total == 1 else "s"),
            file=sys.stderr,
        )
        for doc in failed[:MAX_NAMED]:
            print("  %s: %s" % (label(doc), outcome(doc)), file=sys.stderr)
        if len(failed) > MAX_NAMED:
            print(
                "  ... and %d more (banyan ls --state terminated --state cancelled)" % (len(failed) - MAX_NAMED),
                file=sys.stderr,
            )
    if result.timed_out:
        unfinished = result.unfinished
        print(
            "banyan wait: gave up after %s: %d of %d tasks have not finished"
            % (format_duration(timeout), len(unfinished), total),
            file=sys.stderr,
        )
        reasons = client.tasks_by_id(
            [doc["_id"] for doc in unfinished[:MAX_NAMED]],
            {
                "name": 1,
                "state": 1,
                "pending_parents": 1,
                "held": 1,
                "requested_resources": 1,
                "job": 1,
                "array_limit": 1,
            },
        )
        for doc in unfinished[:MAX_NAMED]:
            now = reasons.get(doc["_id"], doc)
            print("  %s: %s" % (label(now), reason_text(now) or now.get("state")), file=sys.stderr)
        return EXIT_TIMEOUT
    if failed:
        return EXIT_FAILED
    if not quiet:
        if total:
            print("all %d task%s succeeded" % (total, "" if total == 1 else "s"), file=sys.stderr)
        else:
            print("no task to wait for", file=sys.stderr)
    return 0


class ProgressBar:
    """A one-line bar redrawn in place on a terminal; elsewhere a plain line
    when the counts change, at most every `plain_every` seconds."""

    def __init__(self, out, enabled=True, plain_every=10.0, width=None):
        self.out = out
        self.enabled = enabled
        self.tty = enabled and hasattr(out, "isatty") and out.isatty()
        self.plain_every = plain_every
        self.width = width
        self.last_text = None
        self.last_plain = None
        self.drawn = False

    def text(self, p):
        parts = ["%d/%d done" % (p.finished, p.total)]
        if p.running:
            parts.append("%d running" % p.running)
        if p.failed:
            parts.append("%d failed" % p.failed)
        parts.append(format_duration(p.elapsed))
        return "  ".join(parts)

    def update(self, p):
        if not self.enabled:
            return
        text = self.text(p)
        if self.tty:
            import shutil

            columns = self.width or shutil.get_terminal_size((80, 20)).columns
            size = max(10, min(40, columns - len(text) - 4))
            filled = int(size * p.finished / p.total) if p.total else size
            line = "[%s%s] %s" % ("#" * filled, "-" * (size - filled), text)
            self.out.write("\r\x1b[K" + line[: columns - 1])
            self.out.flush()
            self.drawn = True
            return
        counts = text.rsplit("  ", 1)[0]
        now = time.monotonic()
        finished = p.finished == p.total
        if counts != self.last_text and (
            finished or self.last_plain is None or now - self.last_plain >= self.plain_every
        ):
            self.out.write(text + "\n")
            self.out.flush()
            self.last_text, self.last_plain = counts, now

    def close(self):
        if self.tty and self.drawn:
            self.out.write("\n")
            self.out.flush()
