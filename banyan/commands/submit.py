"""`banyan submit`: one task, an array of tasks, or a graph from a YAML file."""

import argparse
import os
import re
import shlex
import sys

from banyan.commands.base import EXIT_USAGE, CommandError, add_command, connect, resolve_job, task_ids
from banyan.graph import GraphError, TaskGraph, load_graph, submit_graph, task_document

#: Most tasks one `--array` may make.
MAX_ARRAY = 100000
ARRAY_ENV = "BANYAN_ARRAY_INDEX"

EPILOG = """
The command runs with /bin/sh -c when it is a single argument (so quote it
to use pipes, &&, $VARIABLES), and is executed directly when it is several.
Put `--` before it, so that its own flags are not read as submit's.

Like Slurm's sbatch, the task runs in the directory where you ran
`banyan submit` (--cwd DIR for another; the path must exist on the
worker), with the worker's environment plus what you pass: --env NAME=VALUE,
--env NAME (its value in this shell), or --export-env (this shell's whole
environment, but BANYAN_TOKEN).

Every submission is a job (one task, an array or a graph): submit names it
on stderr (`job ID NAME: N tasks`); `banyan jobs` lists them, and ls, wait,
cancel, retry, hold and release take --job ID (or its name).

submit prints the new task ids on stdout, one per line (with --file, each
task's id and name), so `ID=$(banyan submit ...)` and
`banyan submit ... | banyan wait -` work. It warns when no live worker could
ever run the task (say it asks for a GPU and no worker has one).

From inside a running task, --child adds tasks to that task's job while it
runs: the tasks that run after the task (declared before it started) wait
for its children as well, so a merge declared `--after SPLITTER` runs
after every shard the splitter added. --after-self adds a task that runs
after the current task only (nothing waits for it). The worker gives each
attempt BANYAN_SERVER, BANYAN_TASK_ID, BANYAN_JOB_ID and BANYAN_TOKEN, a
token that may read the job and add to it while the attempt runs. A job
caps what its tasks add: --max-tasks (tasks added in all, default 1000)
and --max-depth (children of children..., default 10), set when it is
submitted. If the task fails, the children its attempt added are
cancelled, and its retry adds a new set in their place.

examples:
  banyan submit -- 'python3 train.py --epochs 10 > model.log'
  banyan submit --name render --cores 4 --memory '8 GiB' --time-limit 2h -- ./render.sh scene1
  banyan submit --after 65f0c2a1e4b0a1b2c3d4e5f6 -- ./report.sh
  banyan submit --after-any $(banyan ls --job sweep --format id) -- python3 reduce.py
  banyan submit --after-failure 65f0c2a1e4b0a1b2c3d4e5f6 -- ./cleanup.sh
  banyan submit --array 1-100 --name squares -- sh -c 'echo $((BANYAN_ARRAY_INDEX ** 2))'
  banyan submit --array 1-100%4 -- ./step.sh          # at most 4 run at once
  banyan submit --env OMP_NUM_THREADS=4 --env HOME -- python3 train.py
  banyan submit --file graph.yaml --wait
  banyan submit --child --array 1-5 -- ./shard.sh     # run by a task: 5 shards of its job
  banyan submit --after-self -- ./restart.sh         # run by a task: runs once it ended

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
    - name: summary
      command: ./summary.sh
      after_any: [report]     # once report ended, whatever its outcome
    - name: alert
      command: ./alert.sh
      after_failure: [report] # only if report did not succeed

Task fields: name, command, cores, memory, gpus, retries, max_lost, retry_memory_factor, priority,
time_limit, environment, working_directory, max_shutdown_time,
estimated_runtime, after, after_any, after_failure, continuations; an
optional top-level `defaults:` mapping applies to every task (flags such as
--cores act as defaults too).
"""


def register(sub):
    parser = add_command(
        sub,
        "submit",
        run,
        help="queue a task, an array of tasks, or a graph",
        description="Queue a task to run on a worker: a command with the resources it needs. "
        "With --array, many copies of it in one request; with --file, a whole graph "
        "of named tasks and the order they run in. The tasks are ready to run at once "
        "(or, with --after, once those tasks have succeeded).",
        epilog=EPILOG,
    )
    # Values such as "-5s" are read as values (then refused with a message),
    # not as unknown flags ("expected one argument"); no flag here starts "-<digit>".
    parser._negative_number_matcher = re.compile(r"^-\.?\d")
    what = parser.add_argument_group("the task")
    what.add_argument("--name", help="a name to find it by (default: the command's program name)")
    what.add_argument("--cores", help="cores it needs (default 1; may be fractional, or 0)")
    what.add_argument(
        "--memory",
        help="memory it needs, e.g. '512 MiB', '4 GiB' or '4G' (powers of 1024), "
        "'2GB' (powers of 1000); a lower-case b (bits) is refused (default 0)",
    )
    what.add_argument("--gpus", help="GPUs it needs (default 0)")
    what.add_argument("--retries", help="run it again up to N times after a failure (default 0)", metavar="N")
    what.add_argument(
        "--max-lost",
        metavar="N",
        help="run it again up to N times when its worker is lost (machine down, worker "
        "killed); these do not count as --retries (default 3)",
    )
    what.add_argument(
        "--retry-memory-factor",
        metavar="X",
        help="killed for exceeding its memory (on a worker with --enforce-memory), run it "
        "again with X times more memory, up to 3 times (default: not)",
    )
    what.add_argument("--priority", help="higher runs first (default 0)", metavar="N")
    what.add_argument(
        "--time-limit",
        metavar="DURATION",
        help="stop it after this long, more than 0, e.g. 90s, 30m, 2h, 1:30:00 (default: none)",
    )
    what.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="set an environment variable for it (repeatable); NAME alone passes its value in this shell",
    )
    what.add_argument(
        "--export-env",
        action="store_true",
        help="pass this shell's whole environment (but BANYAN_TOKEN); --env adds to it",
    )
    what.add_argument(
        "--cwd", metavar="DIR", help="directory to run it in, on the worker (default: the current directory)"
    )
    how = parser.add_argument_group("how many, and when")
    how.add_argument(
        "--after",
        nargs="+",
        action="extend",
        default=[],
        metavar="ID",
        help="run only after these tasks have succeeded (it is cancelled if one does not)",
    )
    how.add_argument(
        "--after-any",
        nargs="+",
        action="extend",
        default=[],
        metavar="ID",
        help="run after these tasks have ended, whatever their outcome",
    )
    how.add_argument(
        "--after-failure",
        nargs="+",
        action="extend",
        default=[],
        metavar="ID",
        help="run only after these tasks have ended without success (failed, timed out, "
        "cancelled); it is cancelled if one succeeds",
    )
    how.add_argument(
        "--array",
        metavar="SPEC",
        help="one task per index: '1-100', '0-99:10' (a step), '1,4,7-9'; each gets "
        "$%s. '1-100%%%%4' runs at most 4 at once" % ARRAY_ENV,
    )
    how.add_argument("--job-name", metavar="NAME", help="name of the job (default: the task's name)")
    how.add_argument(
        "--job", metavar="JOB", help="add the tasks to this existing job (its id or name) instead of a new one"
    )
    how.add_argument(
        "--child",
        action="store_true",
        help="run by a task: add the tasks to its job; what runs after it waits for them too",
    )
    how.add_argument(
        "--after-self", action="store_true", help="run by a task: add the tasks to its job, to run after it (only)"
    )
    how.add_argument(
        "--max-tasks", metavar="N", help="the most tasks this job's running tasks may add in all (default 1000)"
    )
    how.add_argument(
        "--max-depth", metavar="N", help="how deep tasks added by added tasks may nest in this job (default 10)"
    )
    how.add_argument("--hold", action="store_true", help="submit it held: it runs once released (banyan release)")
    how.add_argument("--file", metavar="GRAPH.yaml", help="submit the tasks of a graph file (see below)")
    how.add_argument("--wait", action="store_true", help="then wait for the tasks to finish, as `banyan wait` does")
    how.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress bar")
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="what to run")
    return parser


def parse_array_limit(spec):
    """'1-100%4' -> ('1-100', 4); '1-100' -> ('1-100', None)."""
    spec, percent, limit = spec.partition("%")
    if not percent:
        return spec, None
    if not limit.isdigit() or int(limit) < 1:
        raise CommandError("--array %s%%%s: the limit after %% must be a whole number >= 1" % (spec, limit), EXIT_USAGE)
    return spec, int(limit)


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


#: Names a task's environment may hold (the server's rule for its keys).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Never passed on by --export-env: the submitter's credentials.
NOT_EXPORTED = ("BANYAN_TOKEN",)


def environment_of(args, environ=None):
    """The task environment --export-env and --env give (None if none)."""
    environ = os.environ if environ is None else environ
    environment = {}
    if args.export_env:
        environment = {
            name: value for name, value in environ.items() if _ENV_NAME.match(name) and name not in NOT_EXPORTED
        }
    for item in args.env:
        name, eq, value = item.partition("=")
        if not _ENV_NAME.match(name):
            raise CommandError(
                "--env %r: expected NAME=VALUE or NAME (a name of letters, digits and _)" % item, EXIT_USAGE
            )
        if not eq:
            if name not in environ:
                raise CommandError(
                    "--env %s: %s is not set in this shell (give --env %s=VALUE)" % (name, name, name), EXIT_USAGE
                )
            value = environ[name]
        environment[name] = value
    return environment or None


def _fields(args):
    """The task fields the flags give (None for those not given)."""
    return {
        "cores": args.cores,
        "memory": args.memory,
        "gpus": args.gpus,
        "retries": args.retries,
        "max_lost": args.max_lost,
        "retry_memory_factor": args.retry_memory_factor,
        "priority": args.priority,
        "time_limit": args.time_limit,
        "environment": environment_of(args),
        "working_directory": os.path.abspath(os.path.expanduser(args.cwd)) if args.cwd else os.getcwd(),
    }


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
        raise CommandError(
            "nothing to run: give the command after --, e.g. banyan submit -- echo hello (or a graph with --file)",
            EXIT_USAGE,
        )
    fields.update(name=args.name or _default_name(command), command=command)
    graph = TaskGraph()
    if not args.array:
        graph.add("task", task_document(fields))
        return graph
    base = task_document(fields)
    for index in parse_array(parse_array_limit(args.array)[0]):
        doc = dict(base, environment=dict(base.get("environment") or {}, **{ARRAY_ENV: str(index)}))
        graph.add(index, doc)
    return graph


def run(args):
    try:
        graph = build_graph(args)
        if args.hold:
            for doc in graph.docs.values():
                doc["held"] = True
        parents = {
            field: task_ids(getattr(args, field), "--" + field.replace("_", "-"))
            for field in ("after", "after_any", "after_failure")
        }
        limit = parse_array_limit(args.array)[1] if args.array else None
        caps = {key: _whole(getattr(args, key), "--" + key.replace("_", "-")) for key in ("max_tasks", "max_depth")}
        client = connect(args)
        if args.child or args.after_self:
            return _run_child(args, client, graph, parents, limit, caps)
        name = (
            args.job_name
            or (args.name if not args.file else os.path.basename(args.file))
            or next(iter(graph.docs.values())).get("name")
        )
        if args.job:
            if limit:
                raise CommandError("--array ...%%N sets the limit of a new job; it does not go with --job", EXIT_USAGE)
            job = resolve_job(client, args.job)
            name = client.get_job(job).get("name") or ""
            if any(value is not None for value in caps.values()):
                raise CommandError(
                    "--max-tasks and --max-depth are set when a job is made; they do not go with --job", EXIT_USAGE
                )
        else:
            job = client.create_job(name, array_limit=limit, **caps)
        ids = submit_graph(client, graph, job=job, **parents)
    except GraphError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for key, task_id in ids.items():
        if args.file:
            print("%s %s" % (task_id, key))
        else:
            print(task_id)
    sys.stdout.flush()
    print(
        "job %s %s: %d task%s%s"
        % (job, name, len(ids), "" if len(ids) == 1 else "s", ", at most %d at once" % limit if limit else ""),
        file=sys.stderr,
    )
    warn_if_nothing_fits(client, graph)
    if args.wait:
        from banyan.commands.wait import wait_and_report

        return wait_and_report(client, list(ids.values()), quiet=args.quiet)
    return 0


def _whole(value, flag):
    if value is None:
        return None
    if not value.isdigit():
        raise CommandError("%s %s: expected a whole number >= 0" % (flag, value), EXIT_USAGE)
    return int(value)


def _run_child(args, client, graph, parents, limit, caps):
    """`--child` / `--after-self`: the tasks join the job of the task this
    runs in, as its children."""
    from banyan.client import running_task_id

    for flag, value in (
        ("--job", args.job),
        ("--job-name", args.job_name),
        ("--array ...%N", limit),
        ("--max-tasks", caps["max_tasks"]),
        ("--max-depth", caps["max_depth"]),
    ):
        if value:
            raise CommandError(
                "%s does not go with --child or --after-self (the tasks join the running task's job)" % flag, EXIT_USAGE
            )
    try:
        task_id = running_task_id()
    except ValueError as exc:
        raise CommandError("--child/--after-self: %s" % exc, EXIT_USAGE) from None
    if args.after_self:
        parents["after"] = list(dict.fromkeys(parents["after"] + [task_id]))
    ids = submit_graph(client, graph, added_by=task_id, **parents)
    for key, new in ids.items():
        print("%s %s" % (new, key) if args.file else new)
    sys.stdout.flush()
    print(
        "job %s: %d task%s added by task %s"
        % (os.environ.get("BANYAN_JOB_ID") or "?", len(ids), "" if len(ids) == 1 else "s", task_id),
        file=sys.stderr,
    )
    if args.wait:
        from banyan.commands.wait import wait_and_report

        return wait_and_report(client, list(ids.values()), quiet=args.quiet)
    return 0


def warn_if_nothing_fits(client, graph):
    """A warning on stderr for each distinct request no live worker could
    ever fit (the server's rule, `banyan.server.reasons`)."""
    from banyan.fit import describe_request, fits, largest_offers, short_of

    workers = client.list_workers(state="active").get("_items", [])
    largest = largest_offers(workers)
    seen = []
    for doc in graph.docs.values():
        asks = dict({"cores": 1, "memory": 0, "gpus": 0}, **(doc.get("requested_resources") or {}))
        if asks in seen or any(fits(asks, w.get("resources") or {}) for w in workers):
            continue
        seen.append(asks)
        if not workers:
            print("banyan submit: warning: no live worker: the tasks wait until one starts", file=sys.stderr)
            return
        short = short_of(asks, largest)
        print(
            "banyan submit: warning: no live worker could ever fit %s: it asks %s; the largest a worker "
            "offers: %s"
            % (doc.get("name") or "the task", describe_request(asks, short), describe_request(largest, short)),
            file=sys.stderr,
        )
