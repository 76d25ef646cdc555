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
import time
import uuid

import pytest
import requests
from flask.testing import FlaskClient

from banyan.server.app import create_app
from banyan.server.store import connect

MONGO_URI = os.environ.get("BANYAN_TEST_MONGO_URI")


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


@pytest.fixture
def app(store):
    client, dbname = store
    application = create_app(client, {"MONGO_DBNAME": dbname, "TESTING": True})
    application.test_client_class = NoServerErrorClient
    return application


@pytest.fixture
def api(app):
    return app.test_client()


@pytest.fixture
def db(app, store):
    client, dbname = store
    return client[dbname]


class LiveServer:
    """A `banyan server` process on a free loopback port."""

    def __init__(self, data_dir, extra_args=(), env=None):
        self.data_dir = str(data_dir)
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.url = None
        self.port = 0

    def start(self, timeout=30):
        args = [sys.executable, "-m", "banyan.cli", "server", "--port", str(self.port),
                "--data-dir", self.data_dir] + self.extra_args
        if MONGO_URI:
            # one database per server under test (same name across restarts)
            base, _, query = MONGO_URI.partition("?")
            uri = "%s/banyan_live_%s" % (base.rstrip("/"), uuid.uuid5(uuid.NAMESPACE_URL, self.data_dir).hex[:12])
            args += ["--mongo-uri", uri + ("?" + query if query else "")]
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
                requests.get(self.url + "/tasks?max_results=1", timeout=2)
                return self
            except requests.ConnectionError:
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
            return [l for l in f.read().decode(errors="replace").splitlines() if "unhandled error" in l]


class CheckedSession(requests.Session):
    """A requests session that fails the test on any 5xx."""

    def request(self, method, url, *args, **kwargs):
        response = super().request(method, url, *args, **kwargs)
        assert response.status_code < 500, "%s %s answered %s: %s" % (
            method, url, response.status_code, response.text[:2000])
        return response


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
