"""`banyan server`: open the store, build the app, serve it with waitress."""

import argparse
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

from banyan.server import site_settings
from banyan.server.site_settings import default_path

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = os.path.join("~", ".banyan")
#: Seconds a thread may hold the interpreter lock while others wait for it.
SWITCH_INTERVAL = 0.001


def add_arguments(parser):
    parser.add_argument(
        "--host",
        default=os.environ.get("BANYAN_HOST", "127.0.0.1"),
        help="address to listen on (default 127.0.0.1; anything beyond loopback requires authentication)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("BANYAN_PORT", 5000)),
        help="port to listen on (default 5000; 0 picks a free one)",
    )
    parser.add_argument(
        "--settings",
        metavar="PATH",
        default=os.environ.get("BANYAN_SETTINGS") or default_path(),
        help="a Python file of site settings (schema additions, VIRTUAL_RESOURCES entries, "
        "limits) applied over the package's defaults (default: $BANYAN_SETTINGS, else "
        "the repository's settings.py when run from a checkout)",
    )
    parser.add_argument(
        "--mongo-uri",
        default=os.environ.get("BANYAN_MONGO_URI"),
        help="MongoDB URI (e.g. mongodb://db1,db2/banyan?replicaSet=rs0); default: the embedded store under --data-dir",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("BANYAN_DATA_DIR", DEFAULT_DATA_DIR),
        help="where the embedded store keeps its data (default ~/.banyan)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=32,
        help="request threads (default 32); at most a quarter of them hold workers' long "
        "polls, the others answer everything else",
    )
    parser.add_argument(
        "--connection-limit",
        type=int,
        default=4096,
        metavar="N",
        help="open connections accepted at once (default 4096: a worker keeps 2 to 4; "
        "the open-files limit is raised to fit when the system allows)",
    )
    parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require tokens (default: on, except on loopback with the embedded "
        "store, where the server may run open for a one-machine trial)",
    )
    parser.add_argument(
        "--archive-after",
        type=float,
        metavar="DAYS",
        default=float(os.environ.get("BANYAN_ARCHIVE_AFTER", 0)) or None,
        help="embedded store: every hour, move the tasks finished more than DAYS ago "
        "(and that nothing unfinished depends on) to DATA_DIR/archive (see `banyan "
        "store archive`, `banyan ls --archive`); default: keep them",
    )
    parser.add_argument("--archive-every", type=float, default=3600.0, metavar="SECONDS", help=argparse.SUPPRESS)
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=float(os.environ.get("BANYAN_HEARTBEAT_TIMEOUT", 30)),
        metavar="SECONDS",
        help="mark a worker lost after this many seconds without a heartbeat (default 30)",
    )
    parser.add_argument(
        "--admin-token-file",
        default=None,
        help="with --auth and no admin token yet, the first start makes one and "
        "writes it here (default: DATA_DIR/admin.token, mode 0600)",
    )


def database_config(mongo_uri):
    """The database named in a MongoDB URI (`mongodb://host/NAME`), if any."""
    if not mongo_uri:
        return {}
    from pymongo import uri_parser

    name = uri_parser.parse_uri(mongo_uri).get("database")
    return {"MONGO_DBNAME": name} if name else {}


def is_loopback(host):
    """True if `host` is (or resolves only to) loopback addresses."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def auth_decision(args):
    """(auth on?, refusal message or None). Open is allowed only on loopback
    with the embedded store; that is also the only case where it is the default."""
    trial = is_loopback(args.host) and not args.mongo_uri
    auth_on = (not trial) if args.auth is None else args.auth
    if auth_on or trial:
        return auth_on, None
    where = "on %s" % args.host if not is_loopback(args.host) else "on MongoDB"
    return False, (
        "banyan server: refusing to start without authentication %s: anyone who can reach it "
        "could run commands on your workers.\n"
        "  Drop --no-auth: with authentication on, the first start makes an admin token and "
        "writes it to a file (see --admin-token-file); make user and worker tokens with "
        "'banyan token create --role user|worker --server URL --token ADMIN_TOKEN'.\n"
        "  Or, for a one-machine trial, listen on loopback (--host 127.0.0.1) with the "
        "embedded store." % where
    )


def run(args):
    """Serve until interrupted (SIGINT or SIGTERM, see `_stop_on_sigterm`).
    Prints the listening URL on one line so that scripts (and tests) can
    wait for it."""
    from waitress.server import create_server

    from banyan.server.app import create_app
    from banyan.server.dispatch import UsersFirstDispatcher
    from banyan.server.services import services
    from banyan.server.store import connect, first, needs_views
    from banyan.store.errors import StoreCorrupt

    auth_on, refusal = auth_decision(args)
    if refusal:
        print(refusal, file=sys.stderr, flush=True)
        return 2
    if not args.heartbeat_timeout > 0:
        print("banyan server: --heartbeat-timeout must be > 0 seconds", file=sys.stderr, flush=True)
        return 2
    if args.threads < 2 or args.connection_limit < 1:
        print("banyan server: --threads must be >= 2 and --connection-limit >= 1", file=sys.stderr, flush=True)
        return 2
    try:
        site = site_settings.load(args.settings) if args.settings else {}
    except site_settings.SiteSettingsError as e:
        print("banyan server: %s" % e, file=sys.stderr, flush=True)
        return 2
    data_dir = None if args.mongo_uri else os.path.expanduser(args.data_dir)
    try:
        client = connect(mongo_uri=args.mongo_uri, data_dir=data_dir)
    except StoreCorrupt as e:
        print("banyan server: %s" % e, file=sys.stderr, flush=True)
        return 1
    app = create_app(
        client,
        dict(
            database_config(args.mongo_uri),
            AUTH=auth_on,
            HEARTBEAT_TIMEOUT=args.heartbeat_timeout,
            # long polls may hold at most a quarter of the request
            # threads (each re-checks the store twice a second)
            CLAIM_MAX_WAITERS=max(1, args.threads // 4),
            WAIT_MAX_WAITERS=max(1, args.threads // 4),
        ),
        site=site,
    )
    _settle_memory()
    if auth_on:
        _bootstrap_admin(app, args)
    # Every step of a request (accept, read, run, write) waits for the
    # interpreter lock; under load, a thread holds it for up to the switch
    # interval (5 ms by default) before the next one may take it.
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Workers' requests may hold the long polls' quarter of the threads, parked,
    # and run on a quarter of them (8 of 32); users' requests are taken
    # first, then workers' heartbeats and reports, then claims
    # (banyan.server.dispatch).
    dispatcher = UsersFirstDispatcher(
        args.threads,
        worker_threads=max(1, args.threads // 4),
        parked=lambda: services(app).claim_waiters.parked,
        users_first=lambda: first(client),
    )
    services(app).claim_waiters.on_park = dispatcher.wake
    dispatcher.on_shutdown = lambda: _release_held(services(app))
    server = create_server(
        app,
        host=args.host,
        port=args.port,
        ident="banyan",
        max_request_body_size=app.config["MAX_CONTENT_LENGTH"],
        _dispatcher=dispatcher,
        **waitress_limits(args, app.config["CLAIM_MAX_WAIT"]),
    )
    host, port = server.effective_host, server.effective_port
    store = args.mongo_uri and "MongoDB" or "embedded store in %s" % data_dir
    print("banyan server listening on http://%s:%s (%s)" % (host, port, store), flush=True)
    if not auth_on:
        print(
            "banyan server: authentication is OFF: anyone who can connect to %s:%s may do "
            "anything (a one-machine trial; start with --auth to require tokens)" % (host, port),
            file=sys.stderr,
            flush=True,
        )
    services(app).reaper.start()
    if needs_views(client):
        threading.Thread(target=define_stats_views, args=(app,), name="banyan-stats-views", daemon=True).start()
    archiver = None
    if args.archive_after is not None and not args.mongo_uri:
        from banyan.store.archive import Archiver

        archiver = Archiver(app.data.driver.db, data_dir, args.archive_after * 86400, args.archive_every)
        archiver.start()
    try:
        _stop_on_sigterm()
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        # A second stop request (a script's or a service manager's retry)
        # must not cut the store's close short; SIGKILL still ends it, and a
        # start then recovers from the journal as after any crash.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        services(app).reaper.stop()
        if archiver is not None:
            archiver.stop()
        server.close()
        client.close()
    return 0


def _stop_on_sigterm():
    """SIGTERM (`kill`, a service manager's stop, `banyan up`) stops the
    server as Ctrl-C does: waitress stops taking requests and the store is
    closed, writing the snapshot its close writes (`Engine.close`). Without
    this, SIGTERM ends the process where it stands and nothing is written."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _release_held(held_by):
    """At a stop: end the long polls (claims, waits, changes) this server holds, so
    that the pool's threads are done before the store closes."""
    held_by.claim_waiters.release_all()
    held_by.finish_waiters.release_all()
    held_by.changes_waiters.release_all()


def waitress_limits(args, claim_max_wait):
    """waitress settings sized for hundreds of workers, each keeping a few
    keep-alive connections (one long poll, heartbeats, reports):
    `connection_limit` (waitress's default, 100, is 25 workers), `poll()`
    rather than `select()` (which fails past 1024 descriptors), a listen
    backlog for reconnection storms, and idle connections closed after
    `channel_timeout` (longer than a long poll plus a heartbeat interval,
    so a live worker's connections stay open)."""
    _raise_open_files_limit(args.connection_limit + 256)
    return {
        "threads": args.threads,
        "connection_limit": args.connection_limit,
        "asyncore_use_poll": True,
        "backlog": 2048,
        "channel_timeout": int(max(60, 2 * claim_max_wait)),
        "cleanup_interval": 15,
    }


def _raise_open_files_limit(wanted):
    """Each connection is a descriptor: raise the soft limit toward `wanted`
    (never above the hard limit)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ImportError, ValueError, OSError) as e:
        log.warning("cannot raise the open files limit: %s", e)
        return
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open files limited to %d: fewer than %d connections can be served", soft, wanted)


def define_stats_views(app):
    """Define (and build) the embedded store's views of an unrestricted
    `/stats` (what an admin and the open mode ask), in the background: from
    then on every write keeps them current, snapshots save them and a start
    after a crash rebuilds them, so no `/stats` builds them inside its
    request (10-25 s at 100,000 tasks). A user's own `/stats`, restricted to
    their tasks, still defines its views at its first read."""
    from pymongo.errors import InvalidOperation

    from banyan.server.stats import TASKS, task_stats
    from banyan.store.errors import StoreUnavailable

    try:
        with app.app_context():
            task_stats(app.data.pymongo(TASKS).db)
    except (InvalidOperation, StoreUnavailable):  # the server stopped first
        pass
    except Exception:  # pylint: disable=broad-except  # a view is no data: `/stats` defines it if asked
        log.warning("could not define the views of /stats at start", exc_info=True)


def _settle_memory():
    """The store's documents live as long as the server: move what start-up
    made out of the garbage collector's way, so that its full collections
    (which stop every thread) look only at what requests make."""
    gc.collect()
    gc.freeze()


def _bootstrap_admin(app, args):
    """First start with authentication on: make an admin token if none exists."""
    from banyan.server.auth import TokenStore

    path = args.admin_token_file or os.path.join(os.path.expanduser(args.data_dir), "admin.token")
    written = TokenStore(app.data.driver.db).bootstrap_admin(path)
    if written:
        print(
            "banyan server: authentication is on; no admin token existed, so one was made and "
            "written to %s (mode 0600). Use it with: banyan token create --role user --name NAME "
            "--server URL --token $(cat %s)" % (written, written),
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            "banyan server: authentication is on (tokens: 'banyan token list|create|revoke')",
            file=sys.stderr,
            flush=True,
        )
