"""The `banyan` command."""

import argparse
import logging
import sys

from banyan import up
from banyan.server import serve
from banyan.tokens_cli import add_token_parser


def build_parser():
    parser = argparse.ArgumentParser(
        prog="banyan",
        description="Banyan: submit tasks to a shared queue and follow them; run the server.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    server = sub.add_parser("server", help="run the Banyan server",
                            description="Run the Banyan server (REST API for tasks and workers).")
    serve.add_arguments(server)
    server.set_defaults(func=serve.run)

    both = sub.add_parser("up", help="run a server and a worker on this machine",
                          description="Run a Banyan server and one worker on this machine (a one-machine start).")
    up.add_arguments(both)
    both.set_defaults(func=up.run)

    add_token_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
