"""Shared fixtures: a store (embedded, or real MongoDB when
BANYAN_TEST_MONGO_URI is set), the app on it, and live server processes.

Every HTTP answer in the suite goes through `assert_not_500`: a 500 is a bug
wherever it shows up.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
import requests
from flask.testing import FlaskClient

from banyan.server.app import create_app
from banyan.server.auth import TokenStore
from banyan.server.store import connect

MONGO_URI = os.environ.get("BANYAN_TEST_MONGO_URI")

#: On a database, servers refuse to run without authentication, so every
#: live server of the suite has this admin token in its database, and every
#: process the suite starts (workers, the CLI) finds it in BANYAN_TOKEN, as
#: a user's would. On the embedded store the servers run open: no token.
TEST_TOKEN = "byn_suite-" + uuid.uuid4().hex if MONGO_URI else None
if TEST_TOKEN:
    os.environ["BANYAN_TOKEN"] = TEST_TOKEN

#: Databases this run made on the server at MONGO_URI, dropped at its end.
_DATABASES = set()


def mongo_uri_for(dbname):
    """MONGO_URI naming database `dbname` (the URI's options kept)."""
    base, _, query = MONGO_URI.partition("?")
    scheme, _, rest = base.partition("://")
    hosts = rest.split("/", 1)[0]
    _DATABASES.add(dbname)
    return "%s://%s/%s%s" % (scheme, hosts, dbname, "?" + query if query else "")


def live_mongo_uri(data_dir):
    """The database URI a LiveServer on `data_dir` serves from (the same
    across restarts of that server)."""
    return mongo_uri_for("banyan_live_%s" % uuid.uuid5(uuid.NAMESPACE_URL, str(data_dir)).hex[:12])


@pytest.fixture(scope="session", autouse=True)
def drop_test_databases():
    """Leave the database server as the run found it."""
    yield
    if MONGO_URI and _DATABASES:
        client = connect(mongo_uri=MONGO_URI)
        try:
            for name in sorted(_DATABASES):
                client.drop_database(name)
        finally:
            client.close()


def assert_not_500(response, what):
    assert response.status_code < 500, "%s answered %s: %s" % (what, response.status_code, response.data[:2000])


class NoServerErrorClient(FlaskClient):
    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        assert_not_500(response, "%s %s" % (kwargs.get("method", "GET"), args[0] if args else ""))
        return response


@pytest.fixture
def store(tmp_path):
    """A fresh store client and database name."""
    dbname = "banyan_test_%s" % uuid.uuid4().hex[:12]
    client = connect(mongo_uri=MONGO_URI, data_dir=None if MONGO_URI else str(tmp_path / "store"))
    yield client, dbname
    if MONGO_URI:
        client.drop_database(dbname)
    client.close()


def provision_test_token(mongo_uri):
    """Put TEST_TOKEN, as an admin token, in the database at `mongo_uri`
    (unless it is there already)."""
    client = connect(mongo_uri=mongo_uri)
    try:
        tokens = TokenStore(client.get_default_database())
        if not tokens.lookup(TEST_TOKEN):
            tokens.create("admin", "suite", token=TEST_TOKEN)
    finally:
        client.close()


def make_app(store, **config):
    """The app on `store` (the fixture's (client, database name)) with the
    settings `config` adds; its test clients fail on any 500."""
    client, dbname = store
    application = create_app(client, dict({"MONGO_DBNAME": dbname, "TESTING": True}, **config))
    application.test_client_class = NoServerErrorClient
    return application


@pytest.fixture
def app(store):
    return make_app(store)


@pytest.fixture
def api(app):
    return app.test_client()


@pytest.fixture
def db(app, store):
    client, dbname = store
    return client[dbname]


class LiveServer:
    """A `banyan server` process on a free loopback port."""

    def __init__(self, data_dir, extra_args=(), env=None, mongo_uri=None, embedded=False, log_level=None):
        self.data_dir = str(data_dir)
        self.extra_args = list(extra_args)
        self.log_level = log_level  # `banyan --log-level`: what the log (data_dir + ".log") shows
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.url = None
        self.port = 0
        # On a database: its own one, unless given (several servers, one
        # database); `embedded`: the embedded store in data_dir whatever the
        # mode (to reopen what `banyan up` wrote).
        self.mongo_uri = (mongo_uri or live_mongo_uri(self.data_dir)) if MONGO_URI and not embedded else None

    def start(self, timeout=30):
        cli = [sys.executable, "-m", "banyan.cli"] + (["--log-level", self.log_level] if self.log_level else [])
        args = cli + ["server", "--port", str(self.port), "--data-dir", self.data_dir] + self.extra_args
        if self.mongo_uri:
            args += ["--mongo-uri", self.mongo_uri]
            if "--auth" not in self.extra_args and "--host" not in self.extra_args:
                # A test that asks for --auth (or a host beyond loopback, which
                # implies it) makes its own tokens; the others get the suite's.
                provision_test_token(self.mongo_uri)
        self.log = open(os.path.join(self.data_dir + ".log"), "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, env=self.env)
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, "server did not start: %r" % line
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        while time.monotonic() < deadline:
            try:
                # (waits for the answer: a first read may be slow on a busy database)
                requests.get(self.url + "/tasks?max_results=1", timeout=max(0.5, deadline - time.monotonic()))
                return self
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.05)
        raise AssertionError("server did not answer")

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.log.close()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def server_errors(self):
        with open(self.data_dir + ".log", "rb") as f:
            return [line for line in f.read().decode(errors="replace").splitlines() if "unhandled error" in line]


class TestSession(requests.Session):
    """A requests session of the suite's user: TEST_TOKEN when the servers
    want one."""

    def __init__(self):
        super().__init__()
        if TEST_TOKEN:
            self.headers["Authorization"] = "Bearer " + TEST_TOKEN


class CheckedSession(TestSession):
    """A requests session that fails the test on any 5xx."""

    def request(self, method, url, *args, **kwargs):
        response = super().request(method, url, *args, **kwargs)
        assert response.status_code < 500, "%s %s answered %s: %s" % (
            method,
            url,
            response.status_code,
            response.text[:2000],
        )
        return response


def stop_process(proc, timeout=15):
    """SIGTERM `proc`, then SIGKILL it if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout, what, interval=0.1):
    """Poll `predicate` every `interval` seconds until it returns something
    true, and return that; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def killed(pid):
    """True once `pid` is gone or a zombie (dead, not reaped yet). One
    look at the process: asked twice, it may end between the two."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def held(request, holding):
    """Send `request` (a long poll of the app in this process) from a thread
    and return (thread, result) once the server holds it: `holding()` counts
    the requests of its kind the server holds. result["reply"] is the
    answer, result["took"] the seconds it took."""
    result = {}

    def run():
        started = time.monotonic()
        result["reply"] = request()
        result["took"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while holding() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert holding() == 1
    return thread, result


def get_task(api, tid):
    """The task `tid` as `GET /tasks/<tid>` answers it (200)."""
    r = api.get("/tasks/%s" % tid)
    assert r.status_code == 200, r.json
    return r.json


def patch_task(api, tid, body, status=200):
    """`PATCH /tasks/<tid>` with `body`, answered `status`; returns the answer."""
    r = api.patch("/tasks/%s" % tid, json=body)
    assert r.status_code == status, r.json
    return r.json


@pytest.fixture
def live_server(tmp_path):
    server = LiveServer(tmp_path / "server-data").start()
    yield server
    server.stop()
    assert server.server_errors() == []


@pytest.fixture
def http():
    with CheckedSession() as session:
        yield session
