"""`banyan submit`: one task, an array of tasks, or a graph from a YAML file."""

import argparse
import os
import re
import shlex
import sys

from banyan.commands.base import EXIT_USAGE, CommandError, add_command, connect, task_ids
from banyan.graph import GraphError, TaskGraph, load_graph, submit_graph, task_document

#: Most tasks one `--array` may make.
MAX_ARRAY = 100000
ARRAY_ENV = "BANYAN_ARRAY_INDEX"

EPILOG = """
The command runs with /bin/sh -c when it is a single argument (so quote it
to use pipes, &&, $VARIABLES), and is executed directly when it is several.
Put `--` before it, so that its own flags are not read as submit's.

submit prints the new task ids on stdout, one per line (with --file, each
task's id and name), so `ID=$(banyan submit ...)` and
`banyan submit ... | banyan wait -` work.

examples:
  banyan submit -- 'python3 train.py --epochs 10 > model.log'
  banyan submit --name render --cores 4 --memory '8 GiB' --time-limit 2h -- ./render.sh scene1
  banyan submit --after 65f0c2a1e4b0a1b2c3d4e5f6 -- ./report.sh
  banyan submit --array 1-100 --name squares -- sh -c 'echo $((BANYAN_ARRAY_INDEX ** 2))'
  banyan submit --file graph.yaml --wait

A graph file names its tasks and says which runs after which:

  tasks:
    - name: fetch
      command: curl -sO https://example.org/data.csv
    - name: clean
      command: [python3, clean.py, data.csv]
      memory: 2 GiB
      after: [fetch]          # or on fetch: `continuations: [clean]`
    - name: report
      command: ./report.sh
      after: [clean]
      retries: 2

Task fields: name, command, cores, memory, gpus, retries, priority,
time_limit, environment, working_directory, max_shutdown_time,
estimated_runtime, after, continuations; an optional top-level `defaults:`
mapping applies to every task (flags such as --cores act as defaults too).
"""


def register(sub):
    parser = add_command(
        sub, "submit", run, help="queue a task, an array of tasks, or a graph",
        description="Queue a task to run on a worker: a command with the resources it needs. "
                    "With --array, many copies of it in one request; with --file, a whole graph "
                    "of named tasks and the order they run in. The tasks are ready to run at once "
                    "(or, with --after, once those tasks have succeeded).",
        epilog=EPILOG)
    # Values such as "-5s" are read as values (then refused with a message),
    # not as unknown flags ("expected one argument"); no flag here starts "-<digit>".
    parser._negative_number_matcher = re.compile(r"^-\.?\d")
    what = parser.add_argument_group("the task")
    what.add_argument("--name", help="a name to find it by (default: the command's program name)")
    what.add_argument("--cores", help="cores it needs (default 1; may be fractional, or 0)")
    what.add_argument("--memory", help="memory it needs, e.g. '512 MiB', '4 GiB', '2GB' (default 0)")
    what.add_argument("--gpus", help="GPUs it needs (default 0)")
    what.add_argument("--retries", help="run it again up to N times after a failure (default 0)",
                      metavar="N")
    what.add_argument("--priority", help="higher runs first (default 0)", metavar="N")
    what.add_argument("--time-limit", metavar="DURATION",
                      help="stop it after this long, e.g. 90s, 30m, 2h, 1:30:00 (default: none)")
    what.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                      help="set an environment variable for it (repeatable)")
    what.add_argument("--cwd", metavar="DIR", help="directory to run it in, on the worker")
    how = parser.add_argument_group("how many, and when")
    how.add_argument("--after", nargs="+", action="extend", default=[], metavar="ID",
                     help="run only after these tasks have succeeded (it is cancelled if one fails)")
    how.add_argument("--array", metavar="SPEC",
                     help="one task per index: '1-100', '0-99:10' (a step), '1,4,7-9'; each gets "
                          "$%s" % ARRAY_ENV)
    how.add_argument("--file", metavar="GRAPH.yaml", help="submit the tasks of a graph file (see below)")
    how.add_argument("--wait", action="store_true",
                     help="then wait for the tasks to finish, as `banyan wait` does")
    how.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress bar")
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="what to run")
    return parser


def parse_array(spec):
    """'1-100', '0-99:10', '1,4,7-9' -> the indices, in order, without repeats."""
    indices = []
    bad = "--array %r: expected indices such as '1-100', '0-99:10' or '1,4,7-9'" % spec
    for part in spec.split(","):
        part = part.strip()
        step = 1
        if ":" in part:
            part, _, step_text = part.partition(":")
            if not step_text.isdigit() or int(step_text) < 1:
                raise CommandError(bad, EXIT_USAGE)
            step = int(step_text)
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise CommandError(bad, EXIT_USAGE)
        first, last = int(first), int(last) if dash else int(first)
        if last < first:
            raise CommandError("--array %r: %d-%d counts down" % (spec, first, last), EXIT_USAGE)
        if (last - first) // step + 1 + len(indices) > MAX_ARRAY:
            raise CommandError("--array %r: more than %d tasks" % (spec, MAX_ARRAY), EXIT_USAGE)
        indices.extend(range(first, last + 1, step))
    return list(dict.fromkeys(indices))


def _command(words):
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        return None
    return words[0] if len(words) == 1 else list(words)


def _default_name(command):
    if isinstance(command, list):
        first = command[0]
    else:
        try:
            first = (shlex.split(command) or [command])[0]
        except ValueError:
            first = command.split()[0]
    return os.path.basename(first) or first


def _fields(args):
    """The task fields the flags give (None for those not given)."""
    environment = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise CommandError("--env %r: expected NAME=VALUE" % item, EXIT_USAGE)
        environment[name] = value
    return {"cores": args.cores, "memory": args.memory, "gpus": args.gpus, "retries": args.retries,
            "priority": args.priority, "time_limit": args.time_limit,
            "environment": environment or None, "working_directory": args.cwd}


def build_graph(args):
    """The graph the flags describe: the --file graph, one task, or an array."""
    command = _command(args.words)
    fields = {key: value for key, value in _fields(args).items() if value is not None}
    if args.file:
        if command is not None:
            raise CommandError("give a COMMAND or --file, not both", EXIT_USAGE)
        for flag in ("name", "array"):
            if getattr(args, flag):
                raise CommandError("--%s does not go with --file (name the tasks in the file)" % flag, EXIT_USAGE)
        return load_graph(args.file, defaults=fields)
    if command is None:
        raise CommandError("nothing to run: give the command after --, e.g. "
                           "banyan submit -- echo hello (or a graph with --file)", EXIT_USAGE)
    fields.update(name=args.name or _default_name(command), command=command)
    graph = TaskGraph()
    if not args.array:
        graph.add("task", task_document(fields))
        return graph
    base = task_document(fields)
    for index in parse_array(args.array):
        doc = dict(base, environment=dict(base.get("environment") or {}, **{ARRAY_ENV: str(index)}))
        graph.add(index, doc)
    return graph


def run(args):
    try:
        graph = build_graph(args)
        after = task_ids(args.after, "--after")
        client = connect(args)
        ids = submit_graph(client, graph, after=after)
    except GraphError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for key, task_id in ids.items():
        if args.file:
            print("%s %s" % (task_id, key))
        else:
            print(task_id)
    sys.stdout.flush()
    if args.array or args.file:
        print("submitted %d tasks" % len(ids), file=sys.stderr)
    if args.wait:
        from banyan.commands.wait import wait_and_report
        return wait_and_report(client, list(ids.values()), quiet=args.quiet)
    return 0
