"""`banyan up`: a server and one worker on this machine, for a one-machine start.

Runs `banyan server` (embedded store unless --mongo-uri) and `banyan-worker`
as child processes, stops both on SIGINT/SIGTERM, and exits when either ends.

The server gets every server flag given to `up` (--auth, --heartbeat-timeout,
--admin-token-file, ...). When it requires tokens, the worker needs a worker
token: `--worker-token` (or $BANYAN_WORKER_TOKEN) if given, else the one an
earlier `up` kept in DATA_DIR/worker.token (mode 0600) while the server still
accepts it, else a new one made with the admin token the server keeps in its
admin token file. The worker gets it through its environment, never on a
command line, where `ps` would show it.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

from banyan.server import serve


def add_arguments(parser):
    serve.add_arguments(parser)
    parser.add_argument("--cores", help="cores the worker may use (default: all)")
    parser.add_argument("--memory", help="memory the worker may use, e.g. '8 GiB' (default: all)")
    parser.add_argument("--gpus", help="GPUs the worker may use (default: all detected)")
    parser.add_argument(
        "--worker-token",
        default=os.environ.get("BANYAN_WORKER_TOKEN"),
        help="with authentication on: the worker's token (default $BANYAN_WORKER_TOKEN, "
        "else DATA_DIR/worker.token, else one made with the admin token file)",
    )


class _Failure(Exception):
    pass


def server_command(args):
    cmd = [
        sys.executable,
        "-m",
        "banyan.cli",
        "server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--data-dir",
        args.data_dir,
        "--threads",
        str(args.threads),
        "--heartbeat-timeout",
        str(args.heartbeat_timeout),
    ]
    if args.mongo_uri:
        cmd += ["--mongo-uri", args.mongo_uri]
    if args.auth is not None:
        cmd.append("--auth" if args.auth else "--no-auth")
    if args.admin_token_file:
        cmd += ["--admin-token-file", args.admin_token_file]
    if args.settings:
        cmd += ["--settings", args.settings]
    return cmd


def admin_token_path(args):
    return os.path.expanduser(args.admin_token_file or os.path.join(args.data_dir, "admin.token"))


def worker_token_path(args):
    return os.path.join(os.path.expanduser(args.data_dir), "worker.token")


def _read_token(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def worker_token(args, url):
    """The token for the worker of a server with authentication on:
    --worker-token, else the one an earlier `up` kept in DATA_DIR/worker.token
    while the server still accepts it, else a new one made with the admin token."""
    from banyan.client import BanyanError, Client
    from banyan.server.auth import write_secret  # Eve: only when `up` runs, not for `banyan --help`

    if args.worker_token:
        return args.worker_token
    kept_path = worker_token_path(args)
    kept = _read_token(kept_path)
    if kept:
        try:
            with Client(url, kept, attempts=3) as client:
                client.list_workers(state="active")
            return kept
        except BanyanError as exc:
            if exc.status not in (401, 403):
                raise _Failure("cannot check the worker token of %s: %s" % (kept_path, exc.describe())) from exc
    path = admin_token_path(args)
    admin = _read_token(path)
    if not admin:
        raise _Failure(
            "authentication is on and the worker has no token: give --worker-token TOKEN (make one "
            "with `banyan token create --role worker --server %s --token ADMIN_TOKEN`), or keep the "
            "admin token in %s" % (url, path)
        )
    name = "banyan-up-%s" % re.sub(r"[^A-Za-z0-9_.@+-]", "-", socket.gethostname() or "host")[:100]
    try:
        with Client(url, admin, attempts=3) as client:
            reply = client.request("POST", ("tokens",), json_body={"role": "worker", "name": name}, idempotent=False)
    except BanyanError as exc:
        raise _Failure("cannot make a worker token with the admin token of %s: %s" % (path, exc.describe())) from exc
    write_secret(kept_path, reply["token"])
    return reply["token"]


def submit_hint(url):
    """How to submit to the server at `url`: a bare `banyan submit` reaches
    only the default address, so any other gets BANYAN_SERVER in the hint."""
    from banyan.config import DEFAULT_SERVER

    if url.rstrip("/") == DEFAULT_SERVER:
        return "submit with `banyan submit -- COMMAND`"
    return "submit with `BANYAN_SERVER=%s banyan submit -- COMMAND` (or `export BANYAN_SERVER=%s`)" % (url, url)


def run(args):
    auth_on, refusal = serve.auth_decision(args)
    if refusal:
        print(refusal, file=sys.stderr, flush=True)
        return 2
    # Own sessions: Ctrl-C in the terminal reaches `up` alone, which stops the
    # worker first (its tasks drain and it reports them), then the server.
    server = subprocess.Popen(server_command(args), stdout=subprocess.PIPE, start_new_session=True)
    line = server.stdout.readline().decode()
    sys.stdout.write(line)
    sys.stdout.flush()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        server.wait()
        print("banyan up: the server did not start (exit code %s)" % server.returncode, file=sys.stderr)
        return 1
    url = match.group(1)
    worker_env = os.environ.copy()
    worker_env.pop("BANYAN_TOKEN", None)  # a user's token is no worker's
    if auth_on:
        try:
            worker_env["BANYAN_TOKEN"] = worker_token(args, url)
        except _Failure as exc:
            print("banyan up: %s" % exc, file=sys.stderr, flush=True)
            server.send_signal(signal.SIGTERM)
            server.wait()
            return 1
    worker_cmd = [sys.executable, "-m", "banyan.worker", "--server", url]
    for flag in ("cores", "memory", "gpus"):
        if getattr(args, flag):
            worker_cmd += ["--" + flag, str(getattr(args, flag))]
    worker = subprocess.Popen(worker_cmd, env=worker_env, start_new_session=True)
    stopping = []

    def stop(signum, frame):
        # The worker stops first (a first signal drains its tasks, a second
        # kills them), so that it can still tell the server it is leaving.
        stopping.append(signum)
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("banyan up: worker started; %s, stop with Ctrl-C" % submit_hint(url), flush=True)
    if auth_on:
        print(
            "banyan up: authentication is on; make yourself a user token with `banyan token create "
            "--role user --name NAME --server %s --token $(cat %s)` and set BANYAN_TOKEN to it"
            % (url, admin_token_path(args)),
            flush=True,
        )
    while worker.poll() is None and server.poll() is None:
        time.sleep(0.2)
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    while worker.poll() is None:
        time.sleep(0.2)
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    server.wait()
    return 0 if stopping else 1
