"""`banyan up`: a server and one worker on this machine, for a one-machine start.

Runs `banyan server` (embedded store unless --mongo-uri) and `banyan-worker`
as child processes, stops both on SIGINT/SIGTERM, and exits when either ends.
"""

import os
import re
import signal
import subprocess
import sys
import time

from banyan.server import serve


def add_arguments(parser):
    serve.add_arguments(parser)
    parser.add_argument("--cores", help="cores the worker may use (default: all)")
    parser.add_argument("--memory", help="memory the worker may use, e.g. '8 GiB' (default: all)")
    parser.add_argument("--gpus", help="GPUs the worker may use (default: all detected)")


def run(args):
    server_cmd = [sys.executable, "-m", "banyan.cli", "server", "--host", args.host, "--port", str(args.port),
                  "--data-dir", args.data_dir, "--threads", str(args.threads)]
    if args.mongo_uri:
        server_cmd += ["--mongo-uri", args.mongo_uri]
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE)
    line = server.stdout.readline().decode()
    sys.stdout.write(line)
    sys.stdout.flush()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        server.wait()
        print("banyan up: the server did not start (exit code %s)" % server.returncode, file=sys.stderr)
        return 1
    url = match.group(1)
    worker_cmd = [sys.executable, "-m", "banyan.worker", "--server", url]
    for flag in ("cores", "memory", "gpus"):
        if getattr(args, flag):
            worker_cmd += ["--" + flag, str(getattr(args, flag))]
    worker = subprocess.Popen(worker_cmd, env=os.environ.copy())
    children = [worker, server]
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("banyan up: worker started; submit with `banyan submit -- COMMAND`, stop with Ctrl-C", flush=True)
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not stopping:
        stop(signal.SIGTERM, None)
    for child in children:
        child.wait()
    return 0 if stopping else 1
