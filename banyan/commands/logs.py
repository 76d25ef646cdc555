"""`banyan logs`: a task's output (stdout to stdout, stderr to stderr)."""

import base64
import sys
import time

from banyan.commands.base import EXIT_USAGE, CommandError, add_command, connect, task_ids
from banyan.errors import BanyanError
from banyan.protocol import FINISHED

EPILOG = """
The worker hands a task's output to the server when an attempt ends (the
last 1 MiB of each stream is kept), so it can be read after the worker is
gone. While an attempt runs, its worker sends what the task writes within
about a second (the last 16 KiB of each stream), so `logs` shows output so
far and `logs --follow` prints it as it comes. The task's stdout goes to stdout and its stderr to stderr, byte for
byte as the task wrote them (output that is not text included).

examples:
  banyan logs 65f0c2a1e4b0a1b2c3d4e5f6
  banyan logs --attempt 1 65f0c2a1e4b0a1b2c3d4e5f6 2>/dev/null
  banyan logs --follow 65f0c2a1e4b0a1b2c3d4e5f6
"""


def register(sub):
    parser = add_command(
        sub,
        "logs",
        run,
        help="print a task's output",
        description="Print the output of a task's latest attempt, or of attempt N.",
        epilog=EPILOG,
    )
    parser.add_argument("id", metavar="ID", help="the task")
    parser.add_argument("--attempt", type=int, metavar="N", help="this attempt (1 is the first; default: latest)")
    parser.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing new output until the task (or attempt N) has finished",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="with --follow: how often to look for new output (default 0.5); the task's end is seen at once",
    )


def _task(client, task_id):
    try:
        return client.get_task(task_id, {"state": 1, "current_history": 1, "name": 1})
    except BanyanError as exc:
        if exc.status == 404:
            raise CommandError("no such task (or not yours): %s" % task_id) from None
        raise


def _logs(client, task_id, attempt, doc):
    try:
        return client.logs(task_id, attempt)
    except BanyanError as exc:
        if exc.status == 404 and attempt is not None:
            last = (doc.get("current_history") or {}).get("attempt") or 0
            raise CommandError("task %s has no attempt %d (it has had %d)" % (task_id, attempt, last)) from None
        raise


def run(args):
    if args.attempt is not None and args.attempt < 1:
        raise CommandError("--attempt must be 1 or more", EXIT_USAGE)
    task_id = task_ids([args.id])[0]
    client = connect(args)
    doc = _task(client, task_id)
    if not args.follow:
        logs = _logs(client, task_id, args.attempt, doc)
        _write(sys.stdout, output_bytes(logs, "stdout"))
        _write(sys.stderr, output_bytes(logs, "stderr"))
        if logs.get("attempt") is None:
            print("banyan logs: task %s has not started yet (it is %s)" % (task_id, doc.get("state")), file=sys.stderr)
        return 0
    return follow(client, task_id, args.attempt, doc, args.interval)


def new_output(data, written, shown):
    """What to print of a stream now: `data` is the end of it (its last
    bytes), `written` how many bytes the task wrote in all (None: `data` is
    all of it), `shown` how many were printed already. Returns (bytes to
    print, bytes printed in all after them)."""
    if written is None:
        written = len(data)
    start = written - len(data)  # where `data` begins in the stream
    if written <= shown:
        return b"", shown
    if shown < start:  # more came than the server keeps of a running task
        return b"[... %d bytes not shown ...]\n" % (start - shown) + data, written
    return data[shown - start :], written


#: Seconds `logs --follow` waits, once the task is done, for the report
#: that replaces the live output.
REPORT_GRACE = 10.0


def follow(client, task_id, attempt, doc, interval):
    shown = {"stdout": 0, "stderr": 0}
    current, settle = None, None
    while True:
        logs = _logs(client, task_id, attempt, doc)
        if logs.get("attempt") != current:
            if current is not None:
                print("--- attempt %s ---" % logs.get("attempt"), file=sys.stderr, flush=True)
                shown = {"stdout": 0, "stderr": 0}
            current = logs.get("attempt")
        for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            # output of a running attempt comes with the count of bytes written
            data, shown[stream] = new_output(output_bytes(logs, stream), logs.get(stream + "_written"), shown[stream])
            _write(out, data)
        if _done(doc, attempt):
            # The attempt's report replaces its live output right after the
            # task reads as done: wait for it (a while: the worker may be gone).
            if not logs.get("live"):
                return 0
            settle = settle if settle is not None else time.monotonic() + REPORT_GRACE
            if time.monotonic() >= settle:
                return 0
            time.sleep(0.1)
            continue
        _pause(client, task_id, interval)
        # Read the task before its output: output is handed over with the
        # end of an attempt, so once the task reads as done, the next read
        # of the output is complete.
        doc = _task(client, task_id)


def _pause(client, task_id, interval):
    """Until the task has finished or `interval` seconds passed: a wait the
    server holds (so the end is seen at once), else a sleep."""
    try:
        if client.wait_unfinished([task_id], interval).get("waited"):
            return
    except BanyanError as exc:
        if exc.status not in (404, 405):  # a server without POST /tasks/wait
            raise
    time.sleep(interval)


def _done(doc, attempt):
    if doc.get("state") in FINISHED:
        return True
    last = doc.get("current_history") or {}
    if attempt is not None and last.get("attempt") is not None:
        return last["attempt"] > attempt or (last["attempt"] == attempt and last.get("ended") is not None)
    return False


def output_bytes(logs, name):
    """The exact bytes of stream `name` of a logs answer (`name_base64`
    when they are not UTF-8)."""
    if logs.get(name + "_base64"):
        return base64.b64decode(logs[name + "_base64"])
    return (logs.get(name) or "").encode("utf-8")


def _write(out, data):
    """The bytes as the task wrote them (not re-encoded: output need not be text)."""
    if data:
        out.flush()
        out.buffer.write(data)
        out.buffer.flush()
