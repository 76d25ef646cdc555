"""The `banyan` command: submit and follow tasks, run the server.

Every failure a user can cause or meet (bad flags, a refused request, a
server that does not answer) ends with one line on stderr and a non-zero
exit code; no traceback reaches the user (`--log-level DEBUG` shows one).
"""

import argparse
import logging
import sys

from banyan import up
from banyan.commands import register_all
from banyan.commands.base import EXIT_CODES_HELP, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, CommandError
from banyan.server import serve
from banyan.store.cli import add_store_parser
from banyan.tokens_cli import add_token_parser

log = logging.getLogger("banyan.cli")

EPILOG = (
    """
a first run, on one machine:
  banyan up                                   # server and worker (keep it running)
  banyan submit --array 1-100 -- sh -c 'echo $BANYAN_ARRAY_INDEX'
  banyan wait --all && banyan ls

The server and token come from --server/--token, then $BANYAN_SERVER and
$BANYAN_TOKEN, then ~/.config/banyan/config.toml (server = "...", token = "..."),
else http://127.0.0.1:5000. `banyan COMMAND --help` tells more of each.

"""
    + EXIT_CODES_HELP
)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the hint to --help)."""

    def error(self, message):
        self.exit(EXIT_USAGE, "%s: error: %s (see %s --help)\n" % (self.prog, message, self.prog))


def build_parser():
    parser = Parser(
        prog="banyan",
        description="Banyan: submit tasks to a shared queue and follow them; run the server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    register_all(sub)

    server = sub.add_parser(
        "server",
        help="run the Banyan server",
        description="Run the Banyan server (REST API for tasks and workers). Ctrl-C or SIGTERM "
        "stops it cleanly: it stops taking requests, closes its store and exits 0.",
    )
    serve.add_arguments(server)
    server.set_defaults(func=serve.run)

    both = sub.add_parser(
        "up",
        help="run a server and a worker on this machine",
        description="Run a Banyan server and one worker on this machine (a one-machine "
        "start). With authentication on, the worker gets a worker token of "
        "its own, made with the server's admin token.",
    )
    up.add_arguments(both)
    both.set_defaults(func=up.run)

    add_token_parser(sub)
    add_store_parser(sub)
    return parser


def _prog(args):
    return "banyan %s" % args.command if getattr(args, "command", None) else "banyan"


def _one_line(text):
    return " ".join(str(text).split())


def main(argv=None):
    from banyan.errors import BanyanError, ServerUnreachable

    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.error("--log-level %r: use DEBUG, INFO, WARNING or ERROR" % args.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prog = _prog(args)
    try:
        return args.func(args) or 0
    except CommandError as exc:
        _fail(prog, exc)
        return exc.code
    except ServerUnreachable as exc:
        _fail(prog, _unreachable(exc), exc)
        return EXIT_UNREACHABLE
    except BanyanError as exc:
        _fail(prog, _refusal(exc), exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `banyan ls | head`: the reader left; say nothing more.
        try:
            sys.stdout = None
        except Exception:
            pass
        return EXIT_FAILED
    except Exception as exc:  # pylint: disable=broad-except
        # Whatever else went wrong (a port in use, a data directory that
        # cannot be made, a file that is not text): one line, not a
        # traceback; --log-level DEBUG shows the traceback.
        _fail(prog, "%s (%s)" % (exc, type(exc).__name__), exc)
        return EXIT_FAILED


def _unreachable(exc):
    from banyan.errors import WrongScheme

    if isinstance(exc, WrongScheme):
        return "cannot talk to %s: %s" % (exc.url, exc.reason)
    if exc.maybe_done:
        return (
            "no answer from the Banyan server at %s (%s) after it received the request: it may have been "
            "accepted. Check before trying again: `banyan ls --last 20` lists your latest tasks "
            "(`banyan ls --where` and `banyan show ID` say more)" % (exc.url or "?", exc.reason)
        )
    return (
        "cannot reach the Banyan server at %s (%s); is it running? Start one with `banyan up`, "
        "or point to it with --server or BANYAN_SERVER" % (exc.url or "?", exc.reason)
    )


def _refusal(exc):
    if exc.status == 401:
        return (
            "the server wants a token (401: %s): give --token TOKEN or set BANYAN_TOKEN "
            "(or 'token' in ~/.config/banyan/config.toml)" % exc.message
        )
    if exc.status == 403:
        return "not allowed with this token (403: %s)" % exc.message
    return "the server refused: %s" % exc.describe()


def _fail(prog, message, exc=None):
    if exc is not None:
        log.debug("%s failed", prog, exc_info=exc)
    print("%s: %s" % (prog, _one_line(message)), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
