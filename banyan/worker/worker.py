"""The banyan-worker daemon: claim what fits, run it, report it.

A worker is four roles, each a small class with its own state (as Huey gives
each consumer role a class), over one shared record of what the worker holds
(``holdings.Holdings``: claimed, running and dying tasks and their
reservations, under one lock) and its standing with the server
(``registration.Registration``: its id, last contact, the lease):

- ``supervision.Supervision`` (the main thread) starts claimed tasks, samples
  and polls them, runs hooks, acts on cancellations, enforces liveness and
  the drain deadline;
- ``claimer.Claimer`` (a thread) long-polls the server for tasks that fit
  what is free;
- ``heartbeat.Heartbeat`` (a thread) reports liveness, usage and progress, so
  liveness never depends on how long a claim or a report takes;
- ``reporter.Reporter`` (a thread) delivers finished attempts, retrying until
  the server has them (or says 404/409), so a result is never dropped while
  the server is reachable and a slow server never stalls supervision.

``Worker`` owns them: it starts and stops them and handles signals. Every wait is an ``Event.wait`` so a stop request
interrupts it at once.
"""

import collections
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from ..client import BanyanError, Client
from ..units import parse_size
from . import containment, resources
from .claimer import Claimer
from .heartbeat import Heartbeat
from .holdings import Holdings, attempt_of, requested
from .hooks import TimeLimit
from .output import DEFAULT_OUTPUT_CAP, MIN_OUTPUT_CAP
from .pacing import BACKOFF_MAX, BACKOFF_START, TICK, transient
from .registration import Registration, lease_duration
from .reporter import Reporter
from .supervision import CannotContain, Supervision

log = logging.getLogger(__name__)

__all__ = ["WorkerConfig", "Worker", "StartupError", "HEARTBEAT_INTERVAL", "lease_duration", "requested", "attempt_of"]

#: Default seconds between heartbeats (the server's HEARTBEAT_TIMEOUT / 3).
HEARTBEAT_INTERVAL = 10.0
#: Tries to reach the server at start before giving up (exit code 3).
STARTUP_ATTEMPTS = 4


#: Tasks ``banyan-worker`` claims beyond its free slots by default
#: (``--prefetch``): "auto", as many as its cores while its last attempts
#: were short (``Holdings.auto_prefetch``). A prefetched attempt is
#: ``running`` on the server from its claim on (its history's ``started``
#: is the claim's time), so prefetching all the time would show more running
#: on a worker than it has cores; among short tasks it shows that for no
#: longer than a short task runs, and there each task starting with no round
#: trip to the server before it is what makes the throughput.
PREFETCH = "auto"


class StartupError(Exception):
    """The worker could not register with the server at start (exit code 3)."""


@dataclass(frozen=True)
class WorkerConfig:
    """Validated settings of one worker; None for a resource means "detect it"."""

    server: str
    token: Optional[str] = None
    cores: Optional[float] = None
    memory: Optional[int] = None
    gpus: Optional[int] = None
    drain: float = 60.0
    heartbeat: float = HEARTBEAT_INTERVAL
    timeout: Optional[float] = None  # unreachable this long -> kill tasks; default 3 heartbeats
    work_dir: str = field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".banyan", "work"))
    max_tasks: Optional[int] = None  # tasks running at once; None = as many as fit
    claim_wait: float = 20.0  # long-poll seconds per claim
    claim_batch: int = 32  # most tasks asked for in one claim
    prefetch: Union[int, str] = PREFETCH  # tasks claimed beyond free slots, started as slots free; or "auto"
    prefetch_hold: float = 1.0  # seconds a prefetched task may wait before it goes back
    output_cap: int = DEFAULT_OUTPUT_CAP  # bytes of output kept on disk per attempt
    host: str = field(default_factory=socket.gethostname)
    pin: bool = False  # CPU affinity: distinct CPUs per task
    enforce_memory: bool = False  # memory limits in a cgroup, where one can be made
    containment: str = "auto"  # see containment.MODES

    def __post_init__(self):
        if not self.server:
            raise ValueError("a server URL is required (--server or $BANYAN_SERVER)")
        if self.cores is not None and (self.cores != self.cores or self.cores < 0):
            raise ValueError(f"cores must be >= 0, got {self.cores!r}")
        if self.memory is not None:
            object.__setattr__(self, "memory", parse_size(self.memory))
        if self.gpus is not None and (int(self.gpus) != self.gpus or self.gpus < 0):
            raise ValueError(f"gpus must be a whole number >= 0, got {self.gpus!r}")
        for name in ("drain", "claim_wait"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.heartbeat > 0:
            raise ValueError(f"heartbeat must be > 0 seconds, got {self.heartbeat!r}")
        if self.timeout is None:
            object.__setattr__(self, "timeout", 3 * self.heartbeat)
        if not self.timeout > self.heartbeat:
            raise ValueError(
                f"timeout ({self.timeout}s) must be longer than the heartbeat interval ({self.heartbeat}s)"
            )
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {self.max_tasks!r}")
        object.__setattr__(self, "output_cap", parse_size(self.output_cap))
        if self.output_cap < MIN_OUTPUT_CAP:
            raise ValueError(f"output_cap must be at least {MIN_OUTPUT_CAP} bytes, got {self.output_cap!r}")
        if self.prefetch != "auto" and not (isinstance(self.prefetch, int) and self.prefetch >= 0):
            raise ValueError(f"prefetch must be a whole number >= 0 or 'auto', got {self.prefetch!r}")
        if not self.prefetch_hold > 0:
            raise ValueError(f"prefetch_hold must be > 0 seconds, got {self.prefetch_hold!r}")
        if self.claim_batch < 1:
            raise ValueError(f"claim_batch must be >= 1, got {self.claim_batch!r}")
        if self.containment not in containment.MODES:
            raise ValueError(f"containment must be one of {', '.join(containment.MODES)}, not {self.containment!r}")


class Worker:
    """One banyan-worker. ``run()`` returns the process exit code."""

    def __init__(self, config, hooks=None, client_factory=None, subreaper=False):
        """``subreaper``: adopt and reap the orphans of tasks (only for a process
        that is nothing but a worker, as ``banyan-worker`` is; see
        ``executor.become_subreaper``)."""
        self.config = config
        self.subreaper = subreaper
        self._session = None
        if client_factory is None:
            # One client per thread (each with its timeouts) over one shared
            # session: a worker keeps a few connections to its server, not
            # a pool per thread (hundreds of workers share one server).
            self._session = Client.make_session(config.token)

            def client_factory(**kw):
                return Client(config.server, config.token, session=self._session, **kw)

        make = client_factory
        self.client = make(timeout=10.0, attempts=1)

        detected = resources.detect_resources()
        self.total = {
            "cores": float(config.cores) if config.cores is not None else float(detected["cores"]),
            "memory": int(config.memory) if config.memory is not None else int(detected["memory"]),
            "gpus": int(config.gpus) if config.gpus is not None else int(detected["gpus"]),
        }
        self.holdings = Holdings(self.total, pin=config.pin)
        self.registration = Registration(config, self.client, self.total, self.holdings)

        self._stop_event = threading.Event()  # warm stop: no more claims, drain
        self._force_event = threading.Event()  # cold stop: kill and exit
        self._done_event = threading.Event()  # everything reported: stop helper threads
        wake = threading.Event()  # main loop: something to do now

        self.claimer = Claimer(
            config, make(timeout=15.0, attempts=1), self.holdings, self.registration, self._stop_event, wake
        )
        self.heartbeats = Heartbeat(
            make(timeout=max(1.0, min(30.0, config.heartbeat)), attempts=1),
            self.holdings,
            self.registration,
            self._done_event,
            wake,
        )
        self.reporter = Reporter(
            make(timeout=30.0, attempts=1),
            self.holdings,
            self.registration,
            self.claimer,
            self._stop_event,
            self._done_event,
        )
        self.supervision = Supervision(
            config,
            self.holdings,
            self.registration,
            self.reporter,
            list(hooks) if hooks is not None else [TimeLimit()],
            self._stop_event,
            wake,
        )
        self._signals = collections.deque()  # signals received, for the main loop to act on
        self._threads = []

    @property
    def worker_id(self):
        """The worker's id on the server; None while not registered."""
        return self.registration.worker_id

    @worker_id.setter
    def worker_id(self, value):
        self.registration.worker_id = value

    def run(self):
        """Register, then supervise until stopped; returns the exit code."""
        # Signals are noted from the start: one that comes while the worker
        # registers stops it once registered (it unregisters on the way out),
        # rather than interrupt it between the server's answer and its own.
        self._install_signal_handlers()
        self.bootstrap()
        self._take_signals()  # stopped while starting: claim nothing
        self._start_threads()
        try:
            while not self._finished():
                now = time.monotonic()
                self._take_signals()
                try:
                    self.supervision.step(now)
                except Exception:
                    # A bug or an odd OS error must not take running tasks down with it.
                    log.exception("unexpected error in the supervision loop; going on")
                    self._force_event.wait(BACKOFF_START)
                if self._force_event.is_set():
                    break
                self.supervision.wait(TICK)
        finally:
            self.teardown()
        return 1 if self._force_event.is_set() else 0

    def bootstrap(self):
        """Take the work directory, kill what a crashed predecessor on it left,
        and register; StartupError if that cannot be done or the server says no."""
        try:
            self.supervision.contain(subreaper=self.subreaper)
        except CannotContain as exc:
            raise StartupError(str(exc)) from exc
        self.subreaper = self.supervision.subreaper
        log.info("worker on %s with %s", self.config.host, self.total)
        delay = BACKOFF_START
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            try:
                self.register()
                return
            except BanyanError as exc:
                if not transient(exc):
                    raise StartupError(f"cannot register with {self.config.server}: {exc}") from exc
                if attempt == STARTUP_ATTEMPTS:
                    raise StartupError(str(exc)) from exc
                log.warning("cannot reach %s yet (%s); retrying in %.1fs", self.config.server, exc, delay)
                if self._stopped_while_waiting(delay):
                    raise StartupError("stopped before registering") from exc
                delay = min(BACKOFF_MAX, delay * 2)

    def _stopped_while_waiting(self, seconds):
        """Wait ``seconds``; True as soon as a stop is asked (by a call or a signal)."""
        deadline = time.monotonic() + seconds
        while not self._force_event.wait(min(TICK, max(0.0, deadline - time.monotonic()))):
            if self._signals:
                return True
            if time.monotonic() >= deadline:
                return False
        return True

    def register(self):
        """Register with the server now (its errors propagate)."""
        self.registration.register()

    def reset(self, reason):
        """Drop every task and register anew later (see ``Supervision.reset``)."""
        self.supervision.reset(reason)

    # == stopping ===========================================================

    def request_stop(self, signum=None, frame=None):
        """Warm stop: claim nothing more, let running tasks finish within ``drain`` seconds."""
        if self._stop_event.is_set():
            return self.request_force_stop(signum, frame)
        log.warning(
            "stopping: no new tasks; waiting up to %gs for %d running task(s) (signal again to kill them now)",
            self.config.drain,
            len(self.holdings.running),
        )
        self.supervision.drain_deadline = time.monotonic() + self.config.drain
        self._stop_event.set()
        self._nudge()

    def request_force_stop(self, signum=None, frame=None):
        """Cold stop: kill every task's process group and exit."""
        log.warning("forced stop: killing %d task(s)", len(self.holdings.running))
        self._stop_event.set()
        self._force_event.set()
        self._nudge()

    def _nudge(self):
        """Cut the main loop's and the claimer's waits short."""
        self.supervision.wake.set()
        self.holdings.released.set()

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return  # embedded (tests): the owner calls request_stop itself
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame):
        """Only note the signal: a handler runs between two bytecodes of the
        main thread, which may hold the very lock that setting an Event or
        logging takes. The main loop acts on it within a tick."""
        self._signals.append(signum)

    def _take_signals(self):
        """A first signal stops warmly (`request_stop`), the next one coldly."""
        while self._signals:
            self.request_stop(self._signals.popleft())

    def _finished(self):
        """Stopping, nothing running, and every result delivered (or the server is gone)."""
        if not self._stop_event.is_set():
            return False
        holdings = self.holdings
        with holdings.lock:
            busy = holdings.running or holdings.doomed or holdings.inbox
        if busy:
            return False
        return self.reporter.pending() == 0 or self.worker_id is None

    # == threads and teardown ===============================================

    def _start_threads(self):
        for name, target in (
            ("claimer", self.claimer.run),
            ("heartbeat", self.heartbeats.run),
            ("reporter", self.reporter.run),
        ):
            thread = threading.Thread(target=target, name=f"banyan-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def teardown(self):
        """Kill what is left, deliver what can be delivered, unregister."""
        self._stop_event.set()
        forced = self._force_event.is_set()
        self.supervision.end_all(forced)
        if forced:
            # Cold stop: one quick try per report, no retries.
            self._done_event.set()
        else:
            deadline = time.monotonic() + self.config.timeout
            while (
                self.reporter.pending()
                and self.worker_id is not None
                and time.monotonic() < deadline
                and not self._force_event.is_set()
            ):
                self._force_event.wait(TICK)
                self._take_signals()  # a signal now: stop waiting for the server
            self._done_event.set()
        claimer = self._threads[0] if self._threads else None
        for thread in self._threads[1:]:  # heartbeat and reporter
            thread.join(timeout=2.0 if not forced else 0.5)
        # whatever the reporter did not get to
        self.reporter.flush(self.client if forced and self.worker_id is not None else None)
        # Prefetched tasks that never started go back to the queue, not abandoned
        self.holdings.give_up_waiting()
        if self.worker_id is not None:
            self.reporter.hand_back(self.client)
        # Unregister before waiting for the claimer: its long poll may still
        # be open on the server, which ends it (404) once we are stopped,
        # rather than claim a task for a worker that is leaving.
        wid, self.worker_id = self.worker_id, None
        if wid is not None:
            try:
                self.client.unregister_worker(wid)
                log.info("unregistered worker %s", wid)
            except BanyanError as exc:
                log.warning("cannot unregister: %s", exc)
        if claimer is not None:
            claimer.join(timeout=2.0 if not forced else 0.5)
        for client in (self.client, self.claimer.client, self.heartbeats.client, self.reporter.client):
            client.close()
        self.supervision.close()
        if self._session is not None:
            self._session.clear()  # its pooled connections
