"""The banyan-worker daemon: claim what fits, run it, report it.

Three roles, each small (as Huey splits consumer roles):

- the main thread supervises: it starts claimed tasks, samples and polls
  them, runs hooks, acts on cancellations, enforces liveness and shutdown;
- a claimer thread long-polls the server for tasks that fit what is free;
- a heartbeat thread reports liveness, usage and progress, so liveness
  never depends on how long a claim or a report takes;
- a reporter thread delivers finished attempts, retrying until the server
  has them (or says 404/409), so a result is never dropped while the server
  is reachable and a slow server never stalls supervision.

Every wait is an ``Event.wait`` so a stop request interrupts it at once.
The main thread sleeps on ``_wake``, which is set when claimed tasks arrive,
when a control message (cancel, unknown) comes in and when a task's process
exits (a small watcher thread per attempt), so a short task costs no tick.
The claimer sleeps on ``_released`` while every core is taken: a claim then
could only return zero-core tasks, and a long poll would carry stale free
amounts after a task ends.
"""

import base64
import collections
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..client import BanyanError, Client, ServerUnreachable
from ..units import parse_size
from . import containment, resources
from .executor import OUTPUT_LIMIT, Outcome, Spawner, SupervisorPool, TaskProcess, become_subreaper, reap_orphans
from .output import DEFAULT_OUTPUT_CAP, MIN_OUTPUT_CAP
from .hooks import TimeLimit, run_hooks

log = logging.getLogger(__name__)

__all__ = ["WorkerConfig", "Worker", "StartupError", "HEARTBEAT_INTERVAL", "lease_duration"]

#: Default seconds between heartbeats (the server's HEARTBEAT_TIMEOUT / 3).
HEARTBEAT_INTERVAL = 10.0
#: Supervision tick: how quickly exits, cancellations and deadlines are noticed.
TICK = 0.1
#: Seconds between usage samples of a running task.
SAMPLE_INTERVAL = 1.0
#: Seconds between looks at running tasks' progress and output, between heartbeats.
PROGRESS_CHECK = 0.5
#: Bytes of each stream a heartbeat carries of a running task's new output
#: (`banyan logs --follow`); the whole capped output goes with the report.
LIVE_OUTPUT = 16 * 1024
#: Most bytes of live output one heartbeat carries in all (tasks left out
#: go in the next one), so that many chatty tasks cannot flood the server.
LIVE_BUDGET = 512 * 1024
#: Backoff for claims, registration and reports when the server misbehaves.
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0
#: Longest a claim is held open while tasks are running: their resources may
#: come back during the poll, and the request carries the old free amounts.
#: With no core free the claimer does not poll at all; it waits for a task to
#: end, probing (without waiting) this often for tasks that need no core.
BUSY_CLAIM_WAIT = 2.0
#: Most finished attempts delivered in one request.
REPORT_BATCH = 32
#: Longest pause a server's ``retry_after`` may impose on the claimer.
RETRY_AFTER_MAX = 60.0
#: Tries to reach the server at start before giving up (exit code 3).
STARTUP_ATTEMPTS = 4
#: The lease on running tasks is shorter than the server's heartbeat timeout
#: by this margin: max(LEASE_MARGIN_MIN seconds, LEASE_MARGIN_FRACTION of
#: the timeout), the time a supervisor has to kill its task's tree before the
#: server may mark the worker lost and give the task to another one.
LEASE_MARGIN_MIN, LEASE_MARGIN_FRACTION = 1.0, 0.2


def lease_duration(server_timeout):
    """How long a lease lasts, counted from the moment a heartbeat the server
    then acknowledged was sent: the server marks the worker lost no earlier
    than ``server_timeout`` after it received that heartbeat, which is later."""
    margin = max(min(LEASE_MARGIN_MIN, server_timeout / 2), LEASE_MARGIN_FRACTION * server_timeout)
    return server_timeout - margin


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
    timeout: Optional[float] = None       # unreachable this long -> kill tasks; default 3 heartbeats
    work_dir: str = field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".banyan", "work"))
    max_tasks: Optional[int] = None       # tasks running at once; None = as many as fit
    claim_wait: float = 20.0              # long-poll seconds per claim
    claim_batch: int = 32                 # most tasks asked for in one claim
    output_cap: int = DEFAULT_OUTPUT_CAP  # bytes of output kept on disk per attempt
    host: str = field(default_factory=socket.gethostname)
    pin: bool = False                     # CPU affinity: distinct CPUs per task
    enforce_memory: bool = False          # memory limits in a cgroup, where one can be made
    containment: str = "auto"             # see containment.MODES

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
            raise ValueError(f"timeout ({self.timeout}s) must be longer than "
                             f"the heartbeat interval ({self.heartbeat}s)")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {self.max_tasks!r}")
        object.__setattr__(self, "output_cap", parse_size(self.output_cap))
        if self.output_cap < MIN_OUTPUT_CAP:
            raise ValueError(f"output_cap must be at least {MIN_OUTPUT_CAP} bytes, got {self.output_cap!r}")
        if self.claim_batch < 1:
            raise ValueError(f"claim_batch must be >= 1, got {self.claim_batch!r}")
        if self.containment not in containment.MODES:
            raise ValueError(f"containment must be one of {', '.join(containment.MODES)}, "
                             f"not {self.containment!r}")


def requested(task):
    """A task's ``requested_resources`` with the contract's defaults, as numbers."""
    req = task.get("requested_resources") or {}
    cores = req.get("cores")
    memory = req.get("memory")
    gpus = req.get("gpus")
    return {"cores": 1.0 if cores is None else float(cores),
            "memory": 0 if memory is None else parse_size(memory),
            "gpus": 0 if gpus is None else int(gpus)}


def _transient(exc):
    """A failure worth retrying: no answer, a 5xx, a timeout or throttling answer."""
    return isinstance(exc, ServerUnreachable) or exc.status is None or exc.status >= 500 \
        or exc.status in (408, 429)


def attempt_of(task):
    """The attempt number the claim created (last history entry)."""
    for entry in (task.get("history") or [])[-1:] + [task.get("current_history")]:
        if isinstance(entry, dict) and entry.get("attempt") is not None:
            return int(entry["attempt"])
    if task.get("attempt") is not None:
        return int(task["attempt"])
    return len(task.get("history") or []) or 1


class Worker:
    """One banyan-worker. ``run()`` returns the process exit code."""

    def __init__(self, config, hooks=None, client_factory=None, subreaper=False):
        """``subreaper``: adopt and reap the orphans of tasks (only for a process
        that is nothing but a worker, as ``banyan-worker`` is; see
        ``executor.become_subreaper``)."""
        self.config = config
        self.subreaper = subreaper
        self.hooks = list(hooks) if hooks is not None else [TimeLimit()]
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
        self.claim_client = make(timeout=15.0, attempts=1)
        self.heartbeat_client = make(timeout=max(1.0, min(30.0, config.heartbeat)), attempts=1)
        self.report_client = make(timeout=30.0, attempts=1)

        detected = resources.detect_resources()
        self.total = {
            "cores": float(config.cores) if config.cores is not None else float(detected["cores"]),
            "memory": int(config.memory) if config.memory is not None else int(detected["memory"]),
            "gpus": int(config.gpus) if config.gpus is not None else int(detected["gpus"]),
        }
        self.worker_id = None
        self._lock = threading.RLock()
        self._tasks = {}        # task id -> TaskProcess, running and reported in heartbeats
        self._doomed = {}       # task id -> TaskProcess, being killed, never reported
        self._inbox = []        # claimed task documents not started yet
        self._control = collections.deque()  # ("cancel"|"unknown", task id, attempt or None)
        self._reserved = {}     # task id -> requested resources (inbox, tasks, doomed)
        self._gpus = {}         # task id -> GPU indices handed to it
        self._cpus = resources.CpuAllocator(resources.usable_cpus()) if config.pin else None
        self.containment = None  # what keeps tasks' processes together (bootstrap)
        # Supervisors started ahead of their attempts (one per core, up to 4),
        # forked by the spawner once it runs (bootstrap).
        self.supervisors = SupervisorPool(size=max(1, min(4, int(self.total["cores"]))))
        self.spawner = None
        self._work_dir_lock = None
        # The lease on running tasks (see `lease_duration`): until the server
        # tells its heartbeat timeout, the worker's own `timeout`.
        self.lease = config.timeout
        self.heartbeat_interval = config.heartbeat
        self._lease_deadline = None  # monotonic; None before registering
        self._reports = queue.Queue()
        self._unreported = {}   # task id -> report not yet delivered, still held in heartbeats
        self._claim_retry_after = None  # the server's hint when it could not hold a claim open
        self._last_sample = {}
        # One claim at a time (the claimer's, or the one a report carries):
        # each is sized by what is free, and two at once would both count
        # the same free cores.
        self._claim_lock = threading.Lock()

        self._stop_event = threading.Event()     # warm stop: no more claims, drain
        self._force_event = threading.Event()    # cold stop: kill and exit
        self._done_event = threading.Event()     # everything reported: stop helper threads
        self._wake = threading.Event()           # main loop: something to do now
        self._released = threading.Event()       # claimer: resources came back
        self._lost = threading.Event()           # the server forgot us (404): reset
        self._last_contact = time.monotonic()
        self._drain_deadline = None
        self._register_at = 0.0
        self._register_delay = BACKOFF_START
        self._signum = None
        self._signals = collections.deque()   # signals received, for the main loop to act on
        self._threads = []
        self._last_reap = 0.0

    # == table of contents ==================================================

    def run(self):
        """Register, then supervise until stopped; returns the exit code."""
        self.bootstrap()
        self._install_signal_handlers()
        self._start_threads()
        try:
            while not self._finished():
                now = time.monotonic()
                self._take_signals()
                try:
                    self.check_liveness(now)
                    self.maybe_register(now)
                    self.apply_control()
                    self.start_claimed()
                    self.supervise(now)
                    self.reap_orphans(now)
                    self.check_drain(now)
                except Exception:
                    # A bug or an odd OS error must not take running tasks down with it.
                    log.exception("unexpected error in the supervision loop; going on")
                    self._force_event.wait(BACKOFF_START)
                if self._force_event.is_set():
                    break
                self._wait(TICK)
        finally:
            self.teardown()
        return 1 if self._force_event.is_set() else 0

    def bootstrap(self):
        """Take the work directory, kill what a crashed predecessor on it left,
        and register; StartupError if that cannot be done or the server says no."""
        self.contain()
        if self.subreaper and not become_subreaper():
            log.info("cannot become a child subreaper; orphans of tasks go to init")
            self.subreaper = False
        log.info("worker on %s with %s", self.config.host, self.total)
        delay = BACKOFF_START
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            try:
                self.register()
                return
            except BanyanError as exc:
                if not _transient(exc):
                    raise StartupError(f"cannot register with {self.config.server}: {exc}") from exc
                if attempt == STARTUP_ATTEMPTS:
                    raise StartupError(str(exc)) from exc
                log.warning("cannot reach %s yet (%s); retrying in %.1fs", self.config.server, exc, delay)
                if self._force_event.wait(delay):
                    raise StartupError("stopped before registering") from exc
                delay = min(BACKOFF_MAX, delay * 2)

    def contain(self):
        """Lock the work directory, find the cgroups this worker can use and
        kill what the tasks of a previous worker on this directory left."""
        try:
            self._work_dir_lock = containment.lock_work_dir(self.config.work_dir)
            self.containment = containment.detect(self.config.work_dir, self.config.containment,
                                                  memory=self.config.enforce_memory)
        except (containment.WorkDirBusy, RuntimeError, OSError) as exc:
            raise StartupError(str(exc)) from exc
        if self.config.enforce_memory and self.containment.memory_cgroup is None:
            log.error("--enforce-memory: no memory cgroup can be made here; memory is not enforced")
        log.info("tasks contained by %s", self.containment.describe())
        containment.kill_leftovers(self.containment)
        self.spawner = Spawner()
        self.supervisors.spawner = self.spawner
        self.supervisors.fill()

    def register(self):
        self.worker_id = self._register()
        self._lost.clear()
        log.info("registered as worker %s", self.worker_id)

    def _register(self):
        """One registration; learns the server's heartbeat timeout, which sets the lease."""
        sent = time.monotonic()
        reply = self.client.register(self.config.host, dict(self.total))
        timeout = reply.get("heartbeat_timeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            lease = min(lease_duration(float(timeout)), self.config.timeout)
            if lease != self.lease:
                self.lease = lease
                self.heartbeat_interval = min(self.config.heartbeat, lease / 3)
                log.info("server heartbeat timeout %gs: tasks are killed %.1fs after the last "
                         "acknowledged heartbeat; heartbeats every %.1fs",
                         timeout, lease, self.heartbeat_interval)
        self._renew(sent)
        self._contact()
        return reply["_id"]

    def _renew(self, sent):
        """The server heard from us after ``sent`` (monotonic): extend every running task's lease."""
        deadline = sent + self.lease
        with self._lock:
            if self._lease_deadline is not None and deadline <= self._lease_deadline:
                return
            self._lease_deadline = deadline
            running = list(self._tasks.values())
        for proc in running:
            proc.renew(deadline)

    # == stopping ===========================================================

    def request_stop(self, signum=None, frame=None):
        """Warm stop: claim nothing more, let running tasks finish within ``drain`` seconds."""
        if self._stop_event.is_set():
            return self.request_force_stop(signum, frame)
        log.warning("stopping: no new tasks; waiting up to %gs for %d running task(s) "
                    "(signal again to kill them now)", self.config.drain, len(self._tasks))
        self._signum = signum
        self._drain_deadline = time.monotonic() + self.config.drain
        self._stop_event.set()
        self._nudge()

    def request_force_stop(self, signum=None, frame=None):
        """Cold stop: kill every task's process group and exit."""
        log.warning("forced stop: killing %d task(s)", len(self._tasks))
        self._stop_event.set()
        self._force_event.set()
        self._nudge()

    def _nudge(self):
        """Cut the main loop's and the claimer's waits short."""
        self._wake.set()
        self._released.set()

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
        with self._lock:
            busy = self._tasks or self._doomed or self._inbox
        if busy:
            return False
        return self._reports.unfinished_tasks == 0 or self.worker_id is None

    def _wait(self, seconds):
        """The main loop's pause; ends early when there is something to do (see ``_wake``)."""
        self._wake.wait(seconds)
        self._wake.clear()

    # == liveness and registration ==========================================

    def _contact(self):
        self._last_contact = time.monotonic()

    def check_liveness(self, now):
        """Server forgot us, or silent past the timeout: kill and drop every task."""
        if self.worker_id is None:
            return
        if self._lost.is_set():
            self.reset("the server no longer knows worker %s" % self.worker_id)
        elif now - self._last_contact > self.config.timeout:
            self.reset("server unreachable for %.0fs" % (now - self._last_contact))

    def reset(self, reason):
        """Drop everything the server may have given to someone else, and register anew later."""
        with self._lock:
            victims = list(self._tasks.items())
            self._tasks.clear()
            for task in self._inbox:
                self._release(str(task["_id"]))
            self._inbox.clear()
            self._control.clear()
            for task_id, proc in victims:
                self._doomed[task_id] = proc
            for task_id in list(self._reserved):
                if task_id not in self._doomed:  # finished, report pending: not ours any more
                    self._release(task_id)
            self.worker_id = None
        log.error("%s: killing %d task(s) and registering again", reason, len(victims))
        for _, proc in victims:
            proc.terminate(proc.max_shutdown_time, reason="failure", wait=False)
        self._lost.clear()
        self._register_at = time.monotonic()
        self._register_delay = BACKOFF_START

    def maybe_register(self, now):
        """After a reset, register again with backoff (never while stopping)."""
        if self.worker_id is not None or self._stop_event.is_set() or now < self._register_at:
            return
        try:
            self.worker_id = self._register()
        except BanyanError as exc:
            log.warning("cannot register again (retrying in %.1fs): %s", self._register_delay, exc)
            self._register_at = now + self._register_delay
            self._register_delay = min(BACKOFF_MAX, self._register_delay * 2)
            return
        self._contact()
        log.info("registered again as worker %s", self.worker_id)

    # == claiming (claimer thread) ==========================================

    def free(self):
        """What running and claimed tasks leave of the totals."""
        with self._lock:
            used = {"cores": 0.0, "memory": 0, "gpus": 0}
            for req in self._reserved.values():
                for key in used:
                    used[key] += req[key]
        return {"cores": max(0.0, round(self.total["cores"] - used["cores"], 6)),
                "memory": max(0, self.total["memory"] - used["memory"]),
                "gpus": max(0, self.total["gpus"] - used["gpus"])}

    def claim_capacity(self):
        """How many tasks to ask for now."""
        if self.config.max_tasks is None:
            return self.config.claim_batch
        with self._lock:
            held = len(self._tasks) + len(self._inbox) + len(self._doomed)
        return min(self.config.claim_batch, self.config.max_tasks - held)

    def claim_once(self, wait=None, free=None):
        """One claim request; returns how many tasks arrived. Raises the client's errors.

        ``wait`` (long-poll seconds) defaults to ``claim_wait``, capped at
        ``BUSY_CLAIM_WAIT`` while tasks are running.
        """
        wid = self.worker_id
        count = self.claim_capacity()
        if wid is None or count <= 0:
            return 0
        if wait is None:
            with self._lock:
                busy = bool(self._reserved)
            wait = min(self.config.claim_wait, BUSY_CLAIM_WAIT) if busy else self.config.claim_wait
        try:
            reply = self.claim_client.claim(wid, self.free() if free is None else free, count, wait)
        except BanyanError as exc:
            exc.worker_id = wid
            raise
        self._contact()
        return self._take_claimed(wid, reply)

    def _take_claimed(self, wid, reply):
        """Reserve and queue the tasks a claim answer brought (and note its
        cancellations); returns how many."""
        items = reply.get("_items") or []
        retry_after = reply.get("retry_after")
        self._claim_retry_after = (min(float(retry_after), RETRY_AFTER_MAX)
                                   if isinstance(retry_after, (int, float)) and retry_after > 0 else None)
        with self._lock:
            stale = self.worker_id != wid   # reset while the claim was in flight
            if not stale:
                for task in items:
                    self._reserved[str(task["_id"])] = requested(task)
                    self._inbox.append(task)
                self._control.extend(("cancel", str(t), None) for t in reply.get("cancel") or [])
        if stale:
            if items:
                self.hand_back(wid, items)
            return 0
        if items or reply.get("cancel"):
            self._wake.set()
        if items:
            log.info("claimed %d task(s): %s", len(items), ", ".join(str(t["_id"]) for t in items))
        return len(items)

    def hand_back(self, wid, items):
        """Tasks claimed under registration ``wid``, which this worker gave
        up while the claim was in flight: they go back to the queue at once
        (no retry used), rather than wait to be abandoned as unconfirmed."""
        ids = ", ".join(str(t["_id"]) for t in items)
        try:
            released = self.claim_client.release(wid, items)
        except BanyanError as exc:
            log.warning("cannot hand back %d task(s) claimed by the previous registration %s (%s); the "
                        "server abandons them later: %s", len(items), wid, exc, ids)
            return
        log.warning("handed back %d of %d task(s) claimed by the previous registration %s: %s",
                    len(released), len(items), wid, ids)

    def _next_claim(self):
        """``(wait, free)`` for the next claim, or None to wait for resources to come back first."""
        free = self.free()
        with self._lock:
            busy = bool(self._reserved)
        if not busy:
            return self.config.claim_wait, free
        if free["cores"] <= 0:
            return None
        return min(self.config.claim_wait, BUSY_CLAIM_WAIT), free

    def _planned_claim(self, probe=False):
        """``(plan, tasks claimed)``: a claim as ``_next_claim`` plans it (or,
        for a ``probe``, one that does not wait), sized and sent under the
        claim lock; no request when the plan is None."""
        with self._claim_lock:
            plan = (0, self.free()) if probe else self._next_claim()
            return plan, (self.claim_once(*plan) if plan is not None else 0)

    def _claim_loop(self):
        delay = BACKOFF_START
        idle = TICK
        while not self._stop_event.is_set():
            self._released.clear()
            if self.worker_id is None or self.claim_capacity() <= 0:
                self._released.wait(TICK)
                continue
            started = time.monotonic()
            try:
                plan, got = self._planned_claim()
                if plan is None:
                    # Every core is taken: wait for one to come back, probing now
                    # and then (without waiting) for tasks that need no core.
                    if self._released.wait(BUSY_CLAIM_WAIT) or self._stop_event.is_set():
                        continue
                    started = time.monotonic()
                    plan, got = self._planned_claim(probe=True)
            except BanyanError as exc:
                if self._stop_event.is_set():
                    break  # unregistered while the claim waited: the server let go of it
                if exc.status == 404 and getattr(exc, "worker_id", None) == self.worker_id:
                    self._lost.set()
                log.warning("claim failed (retrying in %.1fs): %s", delay, exc)
                self._stop_event.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            except Exception:
                log.exception("unexpected error while claiming")
                self._stop_event.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2)
                continue
            delay = BACKOFF_START
            if got:
                idle = TICK
            elif self._claim_retry_after:
                # Every waiting place on the server was taken: come back
                # when it says, so hundreds of idle workers do not spin.
                self._stop_event.wait(self._claim_retry_after)
            elif plan[0] and time.monotonic() - started < 0.5 * plan[0]:
                # The server did not hold the request (or we had nothing
                # that fits): back off a little, as Huey's idle delay does.
                self._stop_event.wait(idle)
                idle = min(2.0, idle * 2)

    # == supervising (main thread) ==========================================

    def apply_control(self):
        """Act on ``cancel`` and ``unknown`` lists from claims and heartbeats.

        An ``unknown`` concerns the attempt the heartbeat reported: by the
        time the answer arrives that attempt may have ended and the task been
        claimed again, and the new attempt is ours.
        """
        while True:
            with self._lock:
                if not self._control:
                    return
                action, task_id, attempt = self._control.popleft()
                proc = self._tasks.get(task_id)
                pending = next((t for t in self._inbox if str(t["_id"]) == task_id), None)
                if action == "unknown":
                    if proc is not None and attempt is not None and proc.attempt != attempt:
                        proc = None
                    pending = None  # claimed after that heartbeat was sent
                    if proc is not None:
                        del self._tasks[task_id]
                        self._doomed[task_id] = proc
                if pending is not None:
                    self._inbox.remove(pending)
                    self._release(task_id)
            if action == "cancel":
                if proc is not None and proc.stop_reason is None:
                    log.info("task %s: cancellation requested", task_id)
                    proc.terminate(proc.max_shutdown_time, reason="cancelled", wait=False)
                elif pending is not None:
                    self._queue_report(pending, attempt_of(pending), Outcome(None, "cancelled"),
                                       "", "", {"max_rss": 0, "cpu_percent": 0.0})
            elif proc is not None:
                log.warning("task %s: the server says it is no longer ours; killing it", task_id)
                proc.terminate(proc.max_shutdown_time, reason="failure", wait=False)

    def start_claimed(self):
        """Start every claimed task (unless stopping hard)."""
        while True:
            with self._lock:
                if not self._inbox:
                    return
                task = self._inbox.pop(0)
                task_id = str(task["_id"])
                wanted = requested(task)
                gpu_ids = self._assign_gpus(task_id, wanted["gpus"])
                cpus = self._cpus.take(task_id, wanted["cores"]) if self._cpus is not None else None
                # this attempt's own: the task may be claimed again while it dies
                reservation = self._reserved.get(task_id)
                lease = self._lease_deadline
            attempt = attempt_of(task)
            extra_env = {"BANYAN_CORES": "%g" % wanted["cores"], "BANYAN_SERVER": self.config.server,
                         "BANYAN_JOB_ID": str(task.get("job") or "")}
            if cpus:
                extra_env["BANYAN_CPUS"] = ",".join(map(str, cpus))
            if self.total["gpus"] > 0:
                extra_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
            limit = wanted["memory"] if self.config.enforce_memory else None
            proc = TaskProcess(task, attempt, self._attempt_dir(task_id, attempt), extra_env,
                               thread_env=resources.thread_environment(wanted["cores"]), lease=lease,
                               containment=self.containment.spec_for(f"{task_id}-{attempt}", limit)
                               if self.containment is not None else None,
                               cpus=cpus, output_cap=self.config.output_cap, supervisors=self.supervisors,
                               spawner=self.spawner)
            proc.reservation = reservation
            run_hooks(self.hooks, "before_start", proc)
            proc.start()
            proc.sample()
            with self._lock:
                self._tasks[task_id] = proc
                latest = self._lease_deadline
            if latest is not None and latest != lease:
                proc.renew(latest)  # a heartbeat was acknowledged while it started
            self._watch_exit(proc)

    def _watch_exit(self, proc):
        """Wake the main loop as soon as the attempt's process exits (it is reaped there)."""
        if proc.popen is None or proc.poll() is not None:
            self._wake.set()  # never started: its outcome is ready now
            return

        if not isinstance(proc.popen, subprocess.Popen):  # forked by the spawner: not our child
            def watch_spawned(supervisor=proc.popen):
                supervisor.wait()
                self._wake.set()
            threading.Thread(target=watch_spawned, name=f"banyan-watch-{proc.supervisor_pid}",
                             daemon=True).start()
            return

        def watch(pid=proc.supervisor_pid):
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass  # already reaped by the main loop
            except OSError:
                log.debug("cannot watch pid %s", pid, exc_info=True)
            self._wake.set()

        threading.Thread(target=watch, name=f"banyan-watch-{proc.pid}", daemon=True).start()

    def supervise(self, now):
        """Sample, run hooks, and collect the attempts that ended."""
        with self._lock:
            running = list(self._tasks.items())
            doomed = list(self._doomed.items())
        for task_id, proc in running:
            if now - self._last_sample.get(task_id, 0.0) >= SAMPLE_INTERVAL:
                proc.sample(now)
                self._last_sample[task_id] = now
            run_hooks(self.hooks, "on_sample", proc, now)
            outcome = proc.poll(now)
            if outcome is not None and (proc.result or {}).get("lease_expired"):
                self._lease_ran_out(task_id, proc)
            elif outcome is not None:
                self._finish_attempt(task_id, proc, outcome)
        for task_id, proc in doomed:
            if proc.poll(now) is not None:
                log.info("task %s killed and dropped", task_id)
                with self._lock:
                    self._doomed.pop(task_id, None)
                    self._release(task_id, proc.reservation)
                self._remove_attempt_dir(proc)

    def _lease_ran_out(self, task_id, proc):
        """The supervisor killed the task: no heartbeat was acknowledged for a
        lease. The server may have given the task to another worker, so the
        attempt is not ours to report: as when the server is unreachable past
        the timeout, drop every task and register again."""
        with self._lock:
            if self._tasks.get(task_id) is proc:
                del self._tasks[task_id]
                self._doomed[task_id] = proc
            registered = self.worker_id is not None
        if registered:
            self.reset("no heartbeat acknowledged for %.1fs (the lease on task %s ran out)"
                       % (self.lease, task_id))

    def reap_orphans(self, now):
        """As subreaper, reap the dead leftovers of task trees now and then."""
        if not self.subreaper or now - self._last_reap < SAMPLE_INTERVAL:
            return
        self._last_reap = now
        with self._lock:
            keep = {p.supervisor_pid for p in list(self._tasks.values()) + list(self._doomed.values())
                    if p.supervisor_pid is not None}
        reap_orphans(keep)

    def _finish_attempt(self, task_id, proc, outcome):
        run_hooks(self.hooks, "after_exit", proc, outcome)
        usage = proc.usage()
        if proc.sampler is not None:
            usage["cpu_percent"] = proc.sampler.average_cpu_percent()
        with self._lock:
            self._tasks.pop(task_id, None)
            self._last_sample.pop(task_id, None)
            # The task keeps its resources until the server has the report:
            # until then the server counts it as running here, and a claim
            # made now would put more on this worker than it has.
            reservation = proc.reservation
        self._queue_report(proc.task, proc.attempt, outcome,
                           proc.tail_bytes("stdout", OUTPUT_LIMIT), proc.tail_bytes("stderr", OUTPUT_LIMIT),
                           usage, proc, reservation)

    def check_drain(self, now):
        """Past the drain deadline: terminate what is still running (outcome "failure")."""
        if self._drain_deadline is None or now < self._drain_deadline:
            return
        with self._lock:
            running = list(self._tasks.values())
        for proc in running:
            if proc.kill_deadline is None:
                log.warning("task %s still running after the drain period; terminating it", proc.task_id)
                proc.terminate(proc.max_shutdown_time, reason="failure", wait=False)

    # == resources ==========================================================

    def _release(self, task_id, reservation=None):
        """Give back a task's resources (only ``reservation``, when given: the
        task may have been claimed again since)."""
        if reservation is not None and self._reserved.get(task_id) is not reservation:
            return
        if self._reserved.pop(task_id, None) is not None:
            self._released.set()
        self._gpus.pop(task_id, None)
        if self._cpus is not None:
            self._cpus.give_back(task_id)

    def _assign_gpus(self, task_id, count):
        taken = {i for ids in self._gpus.values() for i in ids}
        free = [i for i in range(self.total["gpus"]) if i not in taken]
        if count > len(free):
            log.warning("task %s asks for %d GPU(s) but only %d are free", task_id, count, len(free))
        self._gpus[task_id] = free[:count]
        return self._gpus[task_id]

    def _attempt_dir(self, task_id, attempt):
        return os.path.join(self.config.work_dir, task_id, f"attempt-{attempt}")

    def _remove_attempt_dir(self, proc, reservation=None):
        """Remove an ended attempt's directory, and its task's when empty.
        `reservation`: what the ended attempt still holds, if anything."""
        shutil.rmtree(proc.attempt_dir, ignore_errors=True)
        # Once its report is in, the task may be claimed here again, and the
        # next attempt's directory is made inside the task's: keep the task's
        # directory then. Claims reserve under this same lock.
        with self._lock:
            if self._reserved.get(proc.task_id, reservation) is not reservation:
                return
            try:
                os.rmdir(os.path.dirname(proc.attempt_dir))
            except OSError:
                pass

    # == heartbeats (heartbeat thread) ======================================

    def heartbeat_payload(self):
        """Running attempts, and finished ones whose report is not delivered
        yet: the server keeps an attempt while its worker reports it."""
        with self._lock:
            running = list(self._tasks.items())
            unreported = [r for r in self._unreported.values() if r["worker_id"] == self.worker_id]
        tasks = {r["task_id"]: {"attempt": r["attempt"], "usage": r["usage"]} for r in unreported}
        sent, sent_output = {}, {}
        before = getattr(self, "_sent_output", {})
        budget = LIVE_BUDGET
        for task_id, proc in running:
            entry = {"attempt": proc.attempt, "usage": proc.usage()}
            progress = proc.read_progress()
            if progress is not None:
                entry["progress"] = progress
            written = proc.output_written()
            sent_output[task_id] = before.get(task_id)
            if any(written) and before.get(task_id) != (proc.attempt, written) and budget > 0:
                # new output since the last heartbeat: its end, for `banyan logs --follow`
                entry["output"] = {"stdout_written": written[0], "stderr_written": written[1]}
                for stream in ("stdout", "stderr"):
                    tail = proc.live_tail(stream, LIVE_OUTPUT)
                    budget -= len(tail)
                    entry["output"][stream + "_base64"] = base64.b64encode(tail).decode("ascii")
                sent_output[task_id] = (proc.attempt, written)
            tasks[task_id] = entry
            sent[task_id] = progress
        self._sent_progress, self._sent_output = sent, sent_output
        return tasks

    def _progress_changed(self):
        """True when a running task reported progress, or wrote output, that
        no heartbeat has carried yet."""
        with self._lock:
            running = list(self._tasks.items())
        sent, output = getattr(self, "_sent_progress", {}), getattr(self, "_sent_output", {})
        return any(proc.read_progress() not in (None, sent.get(task_id))
                   or (any(proc.output_written()) and output.get(task_id) != (proc.attempt, proc.output_written()))
                   for task_id, proc in running)

    def heartbeat(self):
        """Send one heartbeat and queue what the server answers."""
        wid = self.worker_id
        if wid is None:
            return
        payload = self.heartbeat_payload()
        sent = time.monotonic()
        try:
            reply = self.heartbeat_client.heartbeat(wid, payload)
        except BanyanError as exc:
            if exc.status == 404 and self.worker_id == wid:
                self._lost.set()
            log.warning("heartbeat failed: %s", exc)
            return
        self._contact()
        with self._lock:
            if self.worker_id != wid:
                return
            self._control.extend(("cancel", str(t), None) for t in reply.get("cancel") or [])
            self._control.extend(("unknown", str(t), (payload.get(str(t)) or {}).get("attempt"))
                                 for t in reply.get("unknown") or [])
            if self._control:
                self._wake.set()
            self._renew(sent)

    def _heartbeat_loop(self):
        while not self._done_event.is_set():
            interval = self.heartbeat_interval
            started = time.monotonic()
            try:
                self.heartbeat()
            except Exception:
                log.exception("unexpected error in heartbeat")
            # Between heartbeats, a task's new progress report goes out at
            # once (within PROGRESS_CHECK seconds): `banyan show` and the
            # API are never a whole heartbeat behind the task.
            while not self._done_event.wait(min(PROGRESS_CHECK, max(0.0, interval - (time.monotonic() - started)))):
                if time.monotonic() - started >= interval:
                    break
                try:
                    if self._progress_changed():
                        break
                except Exception:
                    log.exception("unexpected error reading progress")
                    break

    # == reports (reporter thread) ==========================================

    def _queue_report(self, task, attempt, outcome, stdout, stderr, usage, proc=None, reservation=None):
        report = {"task_id": str(task["_id"]), "attempt": attempt, "outcome": outcome.outcome,
                  "exit_code": outcome.exit_code, "stdout": stdout, "stderr": stderr,
                  "usage": usage, "proc": proc, "reservation": reservation, "worker_id": self.worker_id}
        with self._lock:
            self._unreported[report["task_id"]] = report
        self._reports.put(report)

    def _settle(self, report):
        """The report is delivered (or refused, or given up): free what the task held."""
        with self._lock:
            if self._unreported.get(report["task_id"]) is report:
                del self._unreported[report["task_id"]]
            if report.get("reservation") is not None:
                self._release(report["task_id"], report["reservation"])

    def report(self, report, client=None):
        """Deliver one result; True when done with it (delivered or refused for good)."""
        task_id = report["task_id"]
        client = client or self.report_client
        try:
            stored = client.finish(task_id, report["attempt"], report["outcome"], report["exit_code"],
                                   report["stdout"], report["stderr"], report["usage"])
        except BanyanError as exc:
            if _transient(exc):
                log.warning("cannot report task %s yet: %s", task_id, exc)
                return False
            self._contact()
            if exc.status in (404, 409):
                log.warning("report of task %s attempt %s refused (%s): dropping it",
                            task_id, report["attempt"], exc)
            else:
                log.error("report of task %s attempt %s rejected, dropping it: %s",
                          task_id, report["attempt"], exc)
            return True
        self._contact()
        history = (stored or {}).get("history") or []
        if len(history) >= report["attempt"] and history[report["attempt"] - 1].get("late_report"):
            log.warning("reported task %s attempt %s (%s) after the server had given it up: kept as "
                        "the attempt's late report", task_id, report["attempt"], report["outcome"])
        else:
            log.info("reported task %s attempt %s: %s (exit code %s)", task_id, report["attempt"],
                     report["outcome"], report["exit_code"])
        return True

    def deliver(self, batch):
        """Deliver the results in ``batch`` (a list, emptied of those done
        with: delivered, or refused for good); True when none is left.

        One request: the claim endpoint takes the reports first and, unless
        the claimer has a claim under way, claims in the same request what
        their end frees, so a busy worker needs one round trip per task.
        Without a registration, each goes alone to ``/tasks/<id>/finish``."""
        wid = self.worker_id
        if wid is None:
            batch[:] = [item for item in batch if not self.report(item)]
            return not batch
        claiming = not self._stop_event.is_set() and self._claim_lock.acquire(blocking=False)
        try:
            free, count = (self._free_after(batch), self.claim_capacity()) if claiming else (self.free(), 0)
            reports = [{"task": item["task_id"], "attempt": item["attempt"], "outcome": item["outcome"],
                        "exit_code": item["exit_code"], "stdout": item["stdout"], "stderr": item["stderr"],
                        "usage": item["usage"]} for item in batch]
            try:
                reply = self.report_client.claim(wid, free, max(0, count), 0, finished=reports)
            except BanyanError as exc:
                if _transient(exc):
                    log.warning("cannot report %d task(s) yet: %s", len(batch), exc)
                    return False
                if exc.status == 404 and self.worker_id == wid:
                    self._lost.set()  # registration gone: the reports go one by one once reset
                    return False
                # refused whole (an odd report?): each one alone, for its own answer
                log.warning("reports of %d task(s) refused together (%s); sending each alone", len(batch), exc)
                batch[:] = [item for item in batch if not self.report(item)]
                return not batch
            self._contact()
            self._take_claimed(wid, reply)
        finally:
            if claiming:
                self._claim_lock.release()
        for item, result in zip(batch, reply.get("finished") or []):
            self._log_report(item, result)
        batch.clear()
        return True

    def _free_after(self, batch):
        """What is free once the attempts in ``batch`` are reported (their
        reservations, if still theirs, come back)."""
        with self._lock:
            free = self.free()
            for item in batch:
                reservation = item.get("reservation")
                if reservation is not None and self._reserved.get(item["task_id"]) is reservation:
                    for key in free:
                        free[key] += reservation[key]
        free["cores"] = min(self.total["cores"], round(free["cores"], 6))
        free["memory"] = min(self.total["memory"], free["memory"])
        free["gpus"] = min(self.total["gpus"], free["gpus"])
        return free

    def _log_report(self, item, result):
        error = result.get("_error") if isinstance(result, dict) else None
        if not error and result.get("late_report"):
            log.warning("reported task %s attempt %s (%s) after the server had given it up: kept as "
                        "the attempt's late report", item["task_id"], item["attempt"], item["outcome"])
        elif not error:
            log.info("reported task %s attempt %s: %s (exit code %s)", item["task_id"], item["attempt"],
                     item["outcome"], item["exit_code"])
        elif error.get("code") in (404, 409):
            log.warning("report of task %s attempt %s refused (%s): dropping it",
                        item["task_id"], item["attempt"], error.get("message"))
        else:
            log.error("report of task %s attempt %s rejected, dropping it: %s",
                      item["task_id"], item["attempt"], error.get("message"))

    def _report_loop(self):
        while True:
            try:
                item = self._reports.get(timeout=TICK)
            except queue.Empty:
                if self._done_event.is_set():
                    return
                continue
            taken = [item]
            while len(taken) < REPORT_BATCH:
                try:
                    taken.append(self._reports.get_nowait())
                except queue.Empty:
                    break
            batch = list(taken)
            delay = BACKOFF_START
            try:
                while not self.deliver(batch):
                    if self._done_event.wait(delay):
                        log.error("giving up on the reports of task(s) %s",
                                  ", ".join(item["task_id"] for item in batch))
                        break
                    delay = min(BACKOFF_MAX, delay * 2)
                left = {id(item) for item in batch}
                for item in taken:
                    if id(item) not in left and item["proc"] is not None:
                        self._remove_attempt_dir(item["proc"], item["reservation"])
            except Exception:
                log.exception("unexpected error while reporting task(s) %s",
                              ", ".join(item["task_id"] for item in taken))
            finally:
                for item in taken:
                    self._settle(item)
                    self._reports.task_done()

    # == threads and teardown ===============================================

    def _start_threads(self):
        for name, target in (("claimer", self._claim_loop), ("heartbeat", self._heartbeat_loop),
                             ("reporter", self._report_loop)):
            thread = threading.Thread(target=target, name=f"banyan-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def teardown(self):
        """Kill what is left, deliver what can be delivered, unregister."""
        self._stop_event.set()
        with self._lock:
            left = list(self._tasks.items()) + list(self._doomed.items())
        forced = self._force_event.is_set()
        for _task_id, proc in left:
            if forced:
                proc.kill()
            proc.terminate(0 if forced else proc.max_shutdown_time, reason="failure", wait=True)
        with self._lock:
            for task_id, proc in list(self._tasks.items()):
                self._finish_attempt(task_id, proc, proc.poll())
            self._doomed.clear()
            unstarted, self._inbox = self._inbox, []
        for task in unstarted:  # claimed during a cold stop: hand them back as failed attempts
            self._queue_report(task, attempt_of(task), Outcome(None, "failure"), "",
                               "banyan-worker stopped before starting this task\n",
                               {"max_rss": 0, "cpu_percent": 0.0})
        if forced:
            # Cold stop: one quick try per report, no retries.
            self._done_event.set()
        else:
            deadline = time.monotonic() + self.config.timeout
            while self._reports.unfinished_tasks and self.worker_id is not None \
                    and time.monotonic() < deadline and not self._force_event.is_set():
                self._force_event.wait(TICK)
                self._take_signals()  # a signal now: stop waiting for the server
            self._done_event.set()
        claimer = self._threads[0] if self._threads else None
        for thread in self._threads[1:]:  # heartbeat and reporter
            thread.join(timeout=2.0 if not forced else 0.5)
        while True:  # whatever the reporter did not get to
            try:
                item = self._reports.get_nowait()
            except queue.Empty:
                break
            if forced and self.worker_id is not None:
                self.report(item, self.client)
            self._reports.task_done()
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
        for client in (self.client, self.claim_client, self.heartbeat_client, self.report_client):
            client.close()
        self.supervisors.close()
        if self.spawner is not None:
            self.spawner.close()
        if self.containment is not None:
            self.containment.release()
        if self._work_dir_lock is not None:
            self._work_dir_lock.close()
            self._work_dir_lock = None
        if self._session is not None:
            self._session.close()
