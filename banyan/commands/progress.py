"""`banyan progress`: report progress from inside a running task."""

from banyan.commands.base import EXIT_USAGE, CommandError, add_command

EPILOG = """
Run it from inside a task: the worker passes the reports on with its
heartbeats, and `banyan show ID` prints the latest. Outside a task it fails.
(From any language: echo "0.5 half way" >> "$BANYAN_PROGRESS_FILE".)

examples:
  banyan progress 0.25 "loaded the data"
  banyan progress 1
"""


def register(sub):
    parser = add_command(
        sub,
        "progress",
        run,
        help="report progress from inside a task",
        description="Report how far the current task has got: a fraction between 0 and 1 and an optional message.",
        epilog=EPILOG,
        connect=False,
    )
    parser.add_argument("fraction", help="how much is done, from 0 to 1")
    parser.add_argument("message", nargs="*", help="what is happening")


def run(args):
    from banyan.worker.progress import report_progress

    try:
        report_progress(args.fraction, " ".join(args.message))
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError("cannot write the progress file: %s" % (exc.strerror or exc)) from None
    return 0
