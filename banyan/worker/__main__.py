"""``banyan-worker``: command-line flags -> a checked ``WorkerConfig`` -> ``Worker.run()``.

Exit codes (as Dramatiq's RET_*): 0 clean stop, 1 forced stop or crash,
2 bad arguments, 3 cannot reach or authenticate with the server at start.
"""

import argparse
import logging
import os
import sys

from ..units import parse_size
from .containment import MODES
from .holdings import AUTO_PREFETCH_BELOW, AUTO_PREFETCH_RUNS
from .output import DEFAULT_OUTPUT_CAP
from .worker import HEARTBEAT_INTERVAL, PREFETCH, StartupError, Worker, WorkerConfig

log = logging.getLogger(__name__)

RET_OK, RET_KILLED, RET_ARGS, RET_CONNECT = 0, 1, 2, 3


def _size(text):
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _prefetch(text):
    """``--prefetch``: a whole number >= 0, or "auto"."""
    return text if text == "auto" else _non_negative(int)(text)


def _non_negative(kind):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if value != value or value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
        return value

    return convert


def build_parser():
    parser = argparse.ArgumentParser(
        prog="banyan-worker", description="Run Banyan tasks on this machine: claim what fits, run it, report it."
    )
    parser.add_argument(
        "--server", default=os.environ.get("BANYAN_SERVER"), help="server URL (default: $BANYAN_SERVER)"
    )
    parser.add_argument("--token", default=os.environ.get("BANYAN_TOKEN"), help="worker token (default: $BANYAN_TOKEN)")
    parser.add_argument("--cores", type=_non_negative(float), help="cores to offer (default: all)")
    parser.add_argument(
        "--memory", type=_size, help='memory to offer, e.g. "4 GiB", "512MiB", "2GB" or bytes (default: all)'
    )
    parser.add_argument("--gpus", type=_non_negative(int), help="GPUs to offer (default: all detected)")
    parser.add_argument(
        "--drain",
        type=_non_negative(float),
        default=60.0,
        metavar="SECONDS",
        help="on the first SIGTERM/SIGINT, wait this long for running tasks (default 60)",
    )
    parser.add_argument(
        "--heartbeat",
        type=_non_negative(float),
        default=HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help="seconds between heartbeats (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_non_negative(float),
        metavar="SECONDS",
        help="kill tasks when the server is unreachable this long (default 3 heartbeats)",
    )
    parser.add_argument(
        "--work-dir", default=None, metavar="DIR", help="per-attempt output directories (default ~/.banyan/work)"
    )
    parser.add_argument(
        "--max-tasks", type=_non_negative(int), metavar="N", help="most tasks running at once (default: as many as fit)"
    )
    parser.add_argument(
        "--claim-wait",
        type=_non_negative(float),
        default=20.0,
        metavar="SECONDS",
        help="long-poll time of a claim (default %(default)s)",
    )
    parser.add_argument(
        "--prefetch",
        type=_prefetch,
        default=PREFETCH,
        metavar="N|auto",
        help="claim up to N tasks beyond the free slots, each started as soon as a "
        "slot frees, with no round trip to the server in between (for many short "
        "tasks). A prefetched task shows as running, started at its claim. 0: "
        "never; auto: as many as the worker's cores while each of its last %d "
        "attempts ran under %g s (default %%(default)s)" % (AUTO_PREFETCH_RUNS, AUTO_PREFETCH_BELOW),
    )
    parser.add_argument(
        "--prefetch-hold",
        type=_non_negative(float),
        default=1.0,
        metavar="SECONDS",
        help="a prefetched task not started within this long goes back to the server, "
        "for an idle worker to run (default %(default)s)",
    )
    parser.add_argument(
        "--output-cap",
        type=_size,
        default=DEFAULT_OUTPUT_CAP,
        metavar="SIZE",
        help="most output kept on this machine's disk per attempt, stdout and stderr "
        "together; older output is rotated away, the last 1 MiB of each stream "
        "goes to the server (default 16 MiB)",
    )
    parser.add_argument("--host", default=None, help="host name to register (default: this machine's)")
    parser.add_argument(
        "--pin", action="store_true", help="pin each task to its own CPUs (as many as the cores it asked for)"
    )
    parser.add_argument(
        "--enforce-memory",
        action="store_true",
        help="limit each task to the memory it asked for, in a cgroup (v2 memory "
        "controller, else v1); a task over it is killed with outcome 'oom'",
    )
    parser.add_argument(
        "--containment",
        choices=MODES,
        default="auto",
        help="keep each task's processes in a cgroup v2 ('cgroup': required; 'auto': "
        "when one can be made), or only track them as a subreaper ('subreaper'). "
        "Either way every process a task starts ends with it (default auto)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("BANYAN_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        type=str.upper,
        help="default INFO",
    )
    return parser


def config_from_args(args):
    """A validated WorkerConfig; ValueError names the bad setting."""
    kwargs = dict(
        server=args.server,
        token=args.token,
        cores=args.cores,
        memory=args.memory,
        gpus=args.gpus,
        drain=args.drain,
        heartbeat=args.heartbeat,
        timeout=args.timeout,
        max_tasks=args.max_tasks,
        claim_wait=args.claim_wait,
        pin=args.pin,
        enforce_memory=args.enforce_memory,
        containment=args.containment,
        output_cap=args.output_cap,
        prefetch=args.prefetch,
        prefetch_hold=args.prefetch_hold,
    )
    if args.work_dir:
        kwargs["work_dir"] = os.path.abspath(os.path.expanduser(args.work_dir))
    if args.host:
        kwargs["host"] = args.host
    return WorkerConfig(**kwargs)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on bad flags
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"banyan-worker: error: {exc}", file=sys.stderr)
        return RET_ARGS
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker = Worker(config, subreaper=True)
        return worker.run()
    except StartupError as exc:
        log.error("%s", exc)
        return RET_CONNECT
    except Exception:
        log.critical("banyan-worker crashed", exc_info=True)
        return RET_KILLED


if __name__ == "__main__":
    sys.exit(main())
