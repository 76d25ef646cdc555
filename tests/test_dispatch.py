"""`banyan server`'s thread pool (banyan.server.dispatch), driven with real
threads: a user's request runs while workers' requests wait for their share
of threads, a worker's heartbeat goes before claims, and each claim learns
how long it waited."""

import contextlib
import threading
import time

from banyan.server.dispatch import UsersFirstDispatcher
from banyan.server.held import QUEUED_HEADER, queued_seconds


class Request:
    def __init__(self, command, path):
        self.command, self.path, self.headers = command, path, {}


#: Set while a request runs inside the dispatcher's `users_first()`.
FIRST = threading.local()


@contextlib.contextmanager
def users_first():
    FIRST.on = True
    try:
        yield
    finally:
        FIRST.on = False


class Channel:
    """What the dispatcher is handed by waitress: a channel with a parsed
    request at its head, run by `service()` (here: noted, then held until
    `hold` is set, if given)."""

    def __init__(self, served, command, path, hold=None):
        self.requests = [Request(command, path)]
        self.served, self.hold = served, hold
        self.done = threading.Event()

    def service(self):
        self.first = getattr(FIRST, "on", False)
        self.served.append(self)
        if self.hold is not None:
            self.hold.wait(30)
        self.done.set()


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_users_go_first_heartbeats_before_claims_and_claims_learn_their_wait():
    dispatcher = UsersFirstDispatcher(threads=3, worker_threads=1, users_first=users_first)
    served, release = [], threading.Event()
    try:
        busy = Channel(served, "POST", "/tasks/t1/finish", hold=release)  # a report, holding the workers' thread
        dispatcher.add_task(busy)
        wait_for(lambda: busy in served)
        claim = Channel(served, "POST", "/workers/w2/claim")
        heartbeat = Channel(served, "POST", "/workers/w3/heartbeat")
        user = Channel(served, "GET", "/tasks/t2")
        for channel in (claim, heartbeat, user):
            dispatcher.add_task(channel)
        queued_at = time.monotonic()
        assert user.done.wait(10)  # not behind the workers' requests
        assert claim not in served and heartbeat not in served
        held = time.monotonic() - queued_at
        release.set()
        assert claim.done.wait(10) and heartbeat.done.wait(10)
        assert served == [busy, user, heartbeat, claim]
        wait = float(claim.requests[0].headers[QUEUED_HEADER])
        assert wait >= held - 1e-6  # (written to the microsecond)
        assert queued_seconds({"HTTP_" + QUEUED_HEADER: claim.requests[0].headers[QUEUED_HEADER]}) == wait
        assert QUEUED_HEADER not in heartbeat.requests[0].headers and QUEUED_HEADER not in user.requests[0].headers
        # only the user's request asked the store to let it go first
        assert [c.first for c in served] == [False, True, False, False]
    finally:
        release.set()
        dispatcher.shutdown()


def test_a_clients_own_queued_header_is_overwritten():
    dispatcher = UsersFirstDispatcher(threads=2, worker_threads=1)
    served = []
    try:
        claim = Channel(served, "POST", "/workers/w1/claim")
        claim.requests[0].headers[QUEUED_HEADER] = "1000"  # as a client could send X-Banyan-Queued
        dispatcher.add_task(claim)
        assert claim.done.wait(10)
        assert float(claim.requests[0].headers[QUEUED_HEADER]) < 1000
    finally:
        dispatcher.shutdown()
    assert queued_seconds({}) == 0 and queued_seconds({"HTTP_" + QUEUED_HEADER: "junk"}) == 0
