"""What every `banyan` command that talks to a server shares: the
connection flags, the client, errors that end a command, and text output."""

import argparse
import json
import sys
import textwrap
from datetime import datetime

from banyan.protocol import FINISHED, QUEUED, Outcome, TaskState
from banyan.units import format_size

#: Exit codes of the `banyan` command.
EXIT_OK = 0
EXIT_FAILED = 1  # a task failed, or the server refused a request
EXIT_USAGE = 2  # bad flags or input
EXIT_UNREACHABLE = 3  # no server answered
EXIT_TIMEOUT = 4  # `wait --timeout` ran out

EXIT_CODES_HELP = """exit codes: 0 done; 1 a task failed or the server refused the request;
2 bad arguments or input; 3 the server could not be reached; 4 `wait --timeout` ran out"""


class CommandError(Exception):
    """Ends a command with one line on stderr and exit code `code`."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


def add_command(sub, name, func, help, description, epilog=None, connect=True):
    """A subcommand with a description, examples and (if it talks to a
    server) the --server/--token flags."""
    parser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=textwrap.dedent(epilog).strip() if epilog else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if connect:
        group = parser.add_argument_group("server")
        group.add_argument(
            "--server",
            metavar="URL",
            help="server URL (default: $BANYAN_SERVER, then 'server' in "
            "~/.config/banyan/config.toml, then http://127.0.0.1:5000)",
        )
        group.add_argument(
            "--token", metavar="TOKEN", help="access token (default: $BANYAN_TOKEN, then 'token' in the config file)"
        )
    parser.set_defaults(func=func)
    return parser


def connect(args):
    """A `banyan.Client` for the server and token of the flags, environment or config file."""
    from banyan.client import Client
    from banyan.config import ConfigError, resolve

    try:
        where = resolve(getattr(args, "server", None), getattr(args, "token", None))
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        client = Client(where.server, where.token, attempts=3, backoff=0.5)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    return client


def parse_json_arg(text, flag):
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CommandError("%s is not valid JSON: %s" % (flag, exc), EXIT_USAGE) from None
    if not isinstance(value, dict):
        raise CommandError('%s must be a JSON object, such as \'{"name": "x"}\'' % flag, EXIT_USAGE)
    return value


def task_ids(values, flag="ID"):
    """Task ids from arguments ('-' reads them from stdin, one per line or word)."""
    from banyan.graph import GraphError, check_task_id

    ids = []
    for value in values:
        words = sys.stdin.read().split() if value == "-" else [value]
        for word in words:
            try:
                ids.append(check_task_id(word))
            except GraphError as exc:
                raise CommandError("%s: %s" % (flag, exc), EXIT_USAGE) from None
    return list(dict.fromkeys(ids))


# -- text output -----------------------------------------------------------------


def print_json(value):
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(header, rows, out=None, indent=""):
    out = out or sys.stdout
    rows = [[("" if cell is None else str(cell)) for cell in row] for row in rows]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header))]
    for row in [list(header)] + rows:
        out.write(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def shorten(text, width):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_time(value):
    """An API date (ISO 8601 in UTC; RFC 1123 from HTTP headers) as an
    aware datetime, or None."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        pass
    from email.utils import parsedate_to_datetime  # here: the email package costs `banyan --help` ~10 ms

    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


def format_time(value):
    """An API date in local time, 'YYYY-MM-DD HH:MM:SS' ('' when absent)."""
    moment = parse_time(value)
    if moment is None:
        return value or ""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_duration(seconds):
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return "%.1fs" % seconds if seconds < 10 else "%ds" % round(seconds)
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return "%dm%02ds" % (minutes, secs)
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return "%dh%02dm" % (hours, minutes)
    days, hours = divmod(hours, 24)
    return "%dd%02dh" % (days, hours)


def attempt_runtime(attempt, now=None):
    """Seconds an attempt ran (so far, if it has not ended)."""
    started = parse_time((attempt or {}).get("started"))
    if started is None:
        return None
    ended = parse_time(attempt.get("ended")) or now or datetime.now(started.tzinfo)
    return max(0.0, (ended - started).total_seconds())


def format_bytes(value):
    if value is None or value == "":
        return ""
    try:
        return format_size(value)
    except (TypeError, ValueError):
        return str(value)


def format_number(value):
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def outcome(doc):
    """How a task ended or where it is: 'success', 'failure (exit code 3)', 'running'..."""
    status = doc.get("exit_status")
    state = doc.get("state")
    attempt = doc.get("current_history") or ((doc.get("history") or [None])[-1]) or {}
    if state in FINISHED:
        text = status or state
        code = attempt.get("exit_code")
        if status not in (Outcome.SUCCESS, Outcome.CANCELLED) and code is not None:
            text += " (exit code %s)" % code if code >= 0 else " (killed by signal %s)" % -code
        if doc.get("cancelled_by"):
            text += ": " + cancel_text(doc)
        return text
    if state in QUEUED and doc.get("pending_dependency_count"):
        return "waiting"
    if state == TaskState.AVAILABLE and doc.get("held"):
        return "held"
    return state or ""


def label(doc):
    """'<id> (<name>)' for messages."""
    name = doc.get("name")
    return "%s (%s)" % (doc["_id"], name) if name else doc["_id"]


# -- choosing tasks: ids, --job, --where -----------------------------------------


def add_job_flag(parser, help="only the tasks of this job (its id, or its name: the newest job of that name)"):
    parser.add_argument("--job", metavar="JOB", help=help)


def resolve_job(client, value):
    """A job id from --job: an id, or the name of a job (the newest of that name)."""
    from banyan.graph import GraphError, check_task_id

    try:
        return check_task_id(value)
    except GraphError:
        pass
    reply = client.get("jobs", params={"where": json.dumps({"name": value}), "sort": "-_id", "max_results": 1})
    items = (reply or {}).get("_items") or []
    if not items:
        raise CommandError("--job %s: no job of that id or name (banyan jobs lists them)" % value, EXIT_USAGE)
    return items[0]["_id"]


def job_query(client, args, query=None):
    """`query` narrowed to the job of --job (if given)."""
    query = dict(query or {})
    if getattr(args, "job", None):
        query["job"] = resolve_job(client, args.job)
    return query


def reason_text(doc):
    """Why a task is not running (the server's `pending_reason`), or ''."""
    reason = doc.get("pending_reason") or {}
    return reason.get("message") or ""


def cancel_text(doc):
    """Why a task was cancelled because of a parent, or ''."""
    because = doc.get("cancelled_by") or {}
    if not because:
        return ""
    parent = because.get("task")
    if because.get("name"):
        parent = "%s (%s)" % (parent, because["name"])
    needed = {"success": "its success", "failure": "its failure", "any": "its end"}.get(because.get("needed"), "it")
    return "parent %s ended %s; this task ran only after %s" % (parent, because.get("exit_status"), needed)
