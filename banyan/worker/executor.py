"""Running one attempt of a task under its supervisor.

Each attempt runs under a supervisor process of its own (see
``supervisor.py``): the task gets its own session, and the supervisor, a
child subreaper, ends every process the task started when the task ends, is
cancelled, or when the worker is gone, and kills the task on its own when the
worker's lease on it runs out. Output goes through a pipe per stream, each
drained at once by a thread of the worker into files in a per-attempt
directory that never hold more than the worker's output cap
(``banyan.worker.output``), so a chatty task neither blocks on a full pipe
nor fills the worker's disk.
"""

import contextlib
import json
import logging
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple

import psutil

from ..protocol import Outcome as Ended
from . import supervisor as sup
from .output import DEFAULT_OUTPUT_CAP, RotatingOutput
from .progress import PROGRESS_ENV, read_last_progress
from .resources import ProcessTreeSampler

log = logging.getLogger(__name__)

__all__ = ["Outcome", "TaskProcess", "SupervisorPool", "Spawner", "OUTPUT_LIMIT", "become_subreaper", "reap_orphans"]

#: How much of each stream is sent to the server (the server keeps the same cap).
OUTPUT_LIMIT = 1024 * 1024

#: Seconds to wait, once a task has exited, for its output pipes to be drained.
OUTPUT_DRAIN_TIMEOUT = 10.0

#: How the supervisor is started: the standard library only, no site packages;
#: imported rather than run as a script, so its compiled code is cached.
SUPERVISOR = [
    sys.executable,
    "-I",
    "-S",
    "-c",
    "import sys; sys.path.insert(0, sys.argv[1]); import supervisor; sys.exit(supervisor.main())",
    os.path.dirname(os.path.abspath(sup.__file__)),
]
#: A worker's spawner of supervisors (see ``Spawner`` and ``spawner.py``).
SPAWNER = SUPERVISOR[:4] + [
    "import sys; sys.path.insert(0, sys.argv[1]); import spawner; sys.exit(spawner.serve())",
    SUPERVISOR[5],
]
#: Longest wait for a supervisor to say it started the task (a loaded machine).
START_TIMEOUT = 60.0

#: ``exit_code`` is the process's return code (negative: killed by signal -N),
#: or None when the command could not be started at all. ``outcome`` is the
#: ``banyan.protocol.Outcome`` a worker reports (all but ``abandoned``).
Outcome = namedtuple("Outcome", "exit_code outcome")


def start_supervisor(pass_fds=(), spawner=None):
    """A supervisor process, waiting for its spec on stdin, with the output
    descriptors ``pass_fds`` (stdout, stderr): forked by ``spawner`` when
    there is one (and it answers), else a new interpreter."""
    if spawner is not None:
        try:
            return spawner.spawn(*pass_fds)
        except OSError as exc:
            log.warning("spawner unavailable (%s); starting a supervisor interpreter", exc)
    return subprocess.Popen(
        SUPERVISOR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=pass_fds,
        start_new_session=True,
        close_fds=True,
    )


class Standby:
    """A supervisor started before its attempt, with the pipes its task
    will write its output to (``pipes``: stream -> (read end, write end);
    it has the writing ends under the same numbers)."""

    def __init__(self, spawner=None):
        self.pipes = {}
        try:
            for stream in ("stdout", "stderr"):
                self.pipes[stream] = os.pipe()
            self.popen = start_supervisor(tuple(w for _, w in self.pipes.values()), spawner)
        except BaseException:
            self._close_pipes()
            raise

    def alive(self):
        return self.popen.poll() is None

    def dismiss(self):
        """Let it go unused: end of file on its stdin ends it."""
        self._close_pipes()
        try:
            self.popen.stdin.close()
            self.popen.stdout.close()
            self.popen.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.popen.kill()
            self.popen.wait()

    def _close_pipes(self):
        for fds in self.pipes.values():
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


class SupervisorPool:
    """Supervisors started ahead of time, each waiting for a task's spec.

    A supervisor is a Python interpreter: starting one takes ~30 ms (~1 ms
    when ``spawner``, a ``Spawner``, forks it), which would sit between a
    claim and its task on every attempt (and between a short task's
    submission and its end). Taken from here, starting the task is one
    message on a pipe; a thread starts the next one meanwhile. An
    idle supervisor does nothing until its spec comes (it is not yet a
    subreaper, has no cgroup and holds no lease), and exits at end of file
    on stdin, as when its worker is gone.
    """

    def __init__(self, size=2, spawner=None):
        self.size = size
        self.spawner = spawner
        self._lock = threading.Lock()
        self._wanted = threading.Condition(self._lock)  # notified by `fill` and `close`
        self._ready = []
        self._filler = None
        self._asks = 0  # calls of `fill` so far
        self._failed_at = -1  # `_asks` when a start last failed: wait for the next call
        self._closed = False

    def take(self):
        """A ``Standby`` (None when none is ready: start one yourself)."""
        with self._lock:
            standby = None
            while self._ready and standby is None:
                standby = self._ready.pop(0)
                if not standby.alive():  # died idle (killed by someone): not usable
                    standby.dismiss()
                    standby = None
        self.fill()
        return standby

    def ready_pids(self):
        with self._lock:
            return [standby.popen.pid for standby in self._ready]

    def fill(self):
        """Have supervisors started up to ``size``, by one thread that lives
        as long as the pool (a thread per attempt costs ~0.1 ms of CPU)."""
        with self._lock:
            if self._closed:
                return
            if self._filler is None:
                self._filler = threading.Thread(target=self._fill, name="banyan-supervisor-pool", daemon=True)
                self._filler.start()
            self._asks += 1
            self._wanted.notify()

    def _fill(self):
        """The filler thread: after a failed start it waits for the next
        `fill` (the next attempt's), meanwhile attempts start their own."""
        while True:
            with self._lock:
                while not self._closed and (len(self._ready) >= self.size or self._asks == self._failed_at):
                    self._wanted.wait()
                if self._closed:
                    return
                asks = self._asks
            try:
                standby = Standby(self.spawner)
            except Exception as exc:  # noqa: BLE001 - the thread lives on
                log.warning("cannot start a supervisor ahead of time: %s", exc, exc_info=not isinstance(exc, OSError))
                with self._lock:
                    self._failed_at = asks
                continue
            with self._lock:
                if not self._closed:
                    self._ready.append(standby)
                    continue
            standby.dismiss()
            return

    def close(self):
        """Let the idle supervisors go (and the thread that starts them)."""
        with self._lock:
            self._closed, ready, self._ready = True, self._ready, []
            self._wanted.notify()
        for standby in ready:
            standby.dismiss()


class TaskProcess:
    """One attempt of a task: start it, watch it, stop it, read what it wrote.

    ``task`` is the task document as returned by a claim. ``extra_env`` is
    added after the task's own environment (the worker uses it for
    CUDA_VISIBLE_DEVICES); ``thread_env`` before it (thread counts a task may
    override). ``lease`` is the monotonic deadline the supervisor kills the
    task at unless ``renew`` moves it (None: no lease). ``containment``: the
    supervisor spec's cgroup and record fields (``Containment.spec_for``);
    ``cpus``: CPU ids for the task's affinity. ``supervisors``: a
    ``SupervisorPool`` (else a supervisor is started for this attempt).
    """

    def __init__(
        self,
        task,
        attempt,
        attempt_dir,
        extra_env=None,
        thread_env=None,
        lease=None,
        containment=None,
        cpus=None,
        output_cap=DEFAULT_OUTPUT_CAP,
        supervisors=None,
        spawner=None,
    ):
        self.task = task
        self.supervisors = supervisors  # a SupervisorPool to take a started supervisor from
        #: bytes of output kept on disk, per stream (two files of half each)
        self.stream_cap = max(2, int(output_cap) // 2)
        self.outputs = {}
        self.task_id = str(task.get("_id"))
        self.attempt = attempt
        self.attempt_dir = os.fspath(attempt_dir)
        self.extra_env = dict(extra_env or {})
        self.thread_env = dict(thread_env or {})
        self.lease = lease
        self.containment = dict(containment or {})
        self.cpus = list(cpus) if cpus else None
        self.spawner = spawner  # forks the supervisor; None: a new interpreter
        self.stdout_path = os.path.join(self.attempt_dir, "stdout")
        self.stderr_path = os.path.join(self.attempt_dir, "stderr")
        self.progress_path = os.path.join(self.attempt_dir, "progress")
        self.popen = None  # the supervisor
        self.pgid = None
        self.sampler = None
        self.started = None  # time.monotonic() at start
        self.stop_reason = None  # outcome to report if we stopped it
        self.kill_deadline = None  # monotonic time for SIGKILL after SIGTERM
        self.start_error = None  # why the attempt could not even get its files
        self.reservation = None  # the worker's record of what this attempt holds
        self.result = None  # the supervisor's last word (see supervisor.py)
        self._task_pid = None
        self._task_start = None
        self._kill_sent = None
        self._status = b""
        self._outcome = None
        self._start_err = None  # start(wait=False): a copy of stderr's pipe until it started
        self._start_deadline = None

    # -- starting ---------------------------------------------------------

    @property
    def pid(self):
        """The task's own process (the supervisor's child)."""
        return self._task_pid

    @property
    def supervisor_pid(self):
        return self.popen.pid if self.popen is not None else None

    @property
    def max_shutdown_time(self):
        value = self.task.get("max_shutdown_time")
        return 10.0 if value is None else float(value)

    def environment(self):
        """os.environ + thread counts + the task's ``environment`` + Banyan's own
        variables (BANYAN_TASK_ID, BANYAN_ATTEMPT, and from the worker
        BANYAN_SERVER, BANYAN_JOB_ID; BANYAN_TOKEN, the attempt token of the claim)."""
        env = dict(os.environ)
        env.update(self.thread_env)
        for name, value in (self.task.get("environment") or {}).items():
            env[str(name)] = "" if value is None else str(value)
        env.update(self.extra_env)
        # The attempt's own token (its job, while it runs), never the worker's.
        env.pop("BANYAN_TOKEN", None)
        if self.task.get("attempt_token"):
            env["BANYAN_TOKEN"] = self.task["attempt_token"]
        env["BANYAN_TASK_ID"] = self.task_id
        env["BANYAN_ATTEMPT"] = str(self.attempt)
        env[PROGRESS_ENV] = self.progress_path
        return env

    def start(self, wait=True):
        """Start the command; a command that cannot start becomes a failed outcome, not an exception.

        With ``wait=False`` it returns once the supervisor has the spec,
        without waiting for it to say the task started (a fork and an exec
        away): ``poll()`` takes that answer, and ``pid`` is None until then.
        A worker starts its next task meanwhile."""
        self.started = time.monotonic()
        standby = self.supervisors.take() if self.supervisors is not None else None
        with contextlib.ExitStack() as files:
            try:
                if standby is not None:  # let go of it unless the task gets it
                    files.callback(lambda: self.popen is None and standby.dismiss())
                os.makedirs(self.attempt_dir, exist_ok=True)
                open(self.progress_path, "a").close()
                for stream, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
                    output = self.outputs[stream] = RotatingOutput(path, self.stream_cap // 2)
                    # a supervisor started ahead of time got its pipes' writing ends then
                    read_end, write_end = standby.pipes.pop(stream) if standby is not None else os.pipe()
                    # the writing end goes to the task (through its supervisor);
                    # ours is closed once they have it, so the pipe ends with them
                    pipe = files.enter_context(os.fdopen(write_end, "wb", buffering=0))
                    output.drain(read_end, f"output-{self.task_id}-{stream}")
                    if stream == "stdout":
                        out = pipe
                    else:
                        err = pipe
            except OSError as exc:  # disk full, permissions, no file descriptors left
                self.start_error = f"banyan-worker: cannot prepare {self.attempt_dir} for task {self.task_id}: {exc}\n"
                log.error("task %s attempt %s: %s", self.task_id, self.attempt, self.start_error.strip())
                self._outcome = Outcome(None, Ended.FAILURE.value)
                return
            self._start_command(out, err, standby, wait)

    def _start_command(self, out, err, standby=None, wait=True):
        command = self.task.get("command")
        if command is None or command == [] or command == "":
            # A barrier; the server normally finishes these itself.
            self._outcome = Outcome(0, Ended.SUCCESS.value)
            return
        if isinstance(command, str):
            args = ["/bin/sh", "-c", command]
        else:
            args = [str(part) for part in command]
        cwd = self.task.get("working_directory") or None
        if cwd:
            cwd = os.path.expanduser(cwd)
        spec = dict(
            self.containment,
            args=args,
            cwd=cwd,
            env=self.environment(),
            stdout_fd=out.fileno(),
            stderr_fd=err.fileno(),
            lease=self.lease,
            cpus=self.cpus,
        )
        try:
            # (a supervisor started ahead has `out` and `err` under the same numbers)
            self.popen = (
                standby.popen if standby is not None else start_supervisor((out.fileno(), err.fileno()), self.spawner)
            )
            packed = marshal.dumps(spec)
            data = len(packed).to_bytes(8, "big") + packed
            while data:  # blocking: the supervisor reads the spec before anything else
                data = data[os.write(self.popen.stdin.fileno(), data) :]
            os.set_blocking(self.popen.stdin.fileno(), False)
        except (OSError, ValueError, TypeError) as exc:
            self._cannot_start(err, exc)
            return
        if not wait:
            # kept to write a start failure into the task's stderr; closed once it started
            self._start_err = os.dup(err.fileno())
            self._start_deadline = time.monotonic() + START_TIMEOUT
            return
        self._took_start(self._read_line(START_TIMEOUT), err.fileno())

    def _took_start(self, line, err_fd):
        """The supervisor's first word (None: nothing, or it is gone)."""
        if line is not None and line.startswith("started "):
            self._task_pid = self.pgid = int(line.split()[1])
            self._task_start = sup.start_time(self._task_pid)
            self.sampler = ProcessTreeSampler(self.popen.pid, include_root=False)
            log.info("task %s attempt %s started as pid %s", self.task_id, self.attempt, self.pgid)
            return
        reason = line[len("error ") :] if line and line.startswith("error ") else "its supervisor did not start it"
        self._cannot_start(err_fd, reason)
        self._send("kill")
        self._wait_supervisor()

    def _check_start(self, now, gone):
        """For a start that did not wait: take the supervisor's first word
        once it came (``gone``: the supervisor has exited)."""
        if self._start_err is None:
            return
        line = self._next_line(nonblocking=True)
        if line is None and not gone and now < self._start_deadline:
            return
        err_fd, self._start_err = self._start_err, None
        try:
            self._took_start(line, err_fd)
        finally:
            os.close(err_fd)
        if self.sampler is not None:
            self.sampler.sample(now)  # the first figures, as a start that waited has them

    def _cannot_start(self, err, reason):
        message = f"banyan-worker: cannot start task {self.task_id}: {reason}\n".encode()
        if isinstance(err, int):
            os.write(err, message)
        else:
            err.write(message)
            err.flush()
        log.warning("task %s attempt %s failed to start: %s", self.task_id, self.attempt, reason)
        self._outcome = Outcome(None, Ended.FAILURE.value)

    # -- talking to the supervisor ----------------------------------------

    def _send(self, line):
        """One command to the supervisor; False if it could not take it (gone, or its pipe full)."""
        return self._send_bytes((line + "\n").encode())

    def _send_bytes(self, data):
        if self.popen is None or self.popen.stdin is None:
            return False
        try:
            while data:
                written = os.write(self.popen.stdin.fileno(), data)
                data = data[written:]
        except (BlockingIOError, BrokenPipeError, OSError):
            return False
        return True

    def _next_line(self, nonblocking=False):
        """A whole line the supervisor said and we have not taken, reading
        what is there without waiting; None if there is none yet."""
        if b"\n" not in self._status and nonblocking:
            fd = self.popen.stdout.fileno()
            ready, _, _ = select.select([fd], [], [], 0)
            if ready:
                self._status += os.read(fd, 65536)
        if b"\n" not in self._status:
            return None
        line, _, self._status = self._status.partition(b"\n")
        return line.decode(errors="replace")

    def _read_line(self, timeout):
        """The next line the supervisor says, or None (nothing within ``timeout``, or it is gone)."""
        deadline = time.monotonic() + timeout
        fd = self.popen.stdout.fileno()
        while b"\n" not in self._status:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._status += chunk
        line, _, self._status = self._status.partition(b"\n")
        return line.decode(errors="replace")

    def _wait_supervisor(self):
        try:
            self.popen.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def renew(self, deadline):
        """Move the lease to ``deadline`` (monotonic); the supervisor kills the task past it."""
        self.lease = deadline
        if self._outcome is None and self.popen is not None:
            self._send("lease %r" % deadline)

    def _read_result(self):
        """The supervisor's ``result`` once it has exited (None if it died without one)."""
        fd = self.popen.stdout.fileno()
        os.set_blocking(fd, False)
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._status += chunk
        except BlockingIOError:
            pass
        for line in self._status.decode(errors="replace").splitlines():
            if line.startswith("result "):
                try:
                    return json.loads(line[len("result ") :])
                except ValueError:
                    return None
        return None

    # -- watching ---------------------------------------------------------

    def poll(self, now=None):
        """None while running, else the ``Outcome`` (computed once).

        Also escalates to SIGKILL once a pending termination's grace period
        is over, so the caller only has to keep polling.
        """
        if self._outcome is not None:
            return self._outcome
        now = time.monotonic() if now is None else now
        running = self.popen.poll() is None
        self._check_start(now, not running)
        if self._outcome is not None:  # it could not start
            return self._outcome
        if running:
            if self.kill_deadline is not None and now >= self.kill_deadline:
                self.kill()
            if self._kill_sent is not None and now - self._kill_sent > sup.KILL_WAIT + 5:
                log.error("task %s: supervisor %s does not end; killing it", self.task_id, self.popen.pid)
                self.popen.kill()
            return None
        self.result = self._read_result()
        if self.result is None:
            log.error(
                "task %s: supervisor %s died (exit code %s); killing what it left",
                self.task_id,
                self.popen.pid,
                self.popen.returncode,
            )
            self._kill_leftovers()
            code, outcome = None, self.stop_reason or Ended.FAILURE.value
        else:
            code = self.result.get("exit_code")
            if self.stop_reason is not None and self.result.get("stopped", True):
                outcome = self.stop_reason
            elif self.result.get("oom") and code != 0:
                outcome = Ended.OOM.value
            else:
                succeeded = code == 0 and not self.result.get("lease_expired")
                outcome = Ended.SUCCESS.value if succeeded else Ended.FAILURE.value
            if self.result.get("lease_expired"):
                log.error("task %s attempt %s: its lease ran out; the supervisor killed it", self.task_id, self.attempt)
        self._outcome = Outcome(code, outcome)
        log.info("task %s attempt %s exited with %s (%s)", self.task_id, self.attempt, code, outcome)
        return self._outcome

    def _kill_leftovers(self):
        """What a supervisor that died left: its record's processes, the task, its cgroups."""
        record, processes = self.containment.get("record"), []
        if record:
            try:
                with open(record) as fh:
                    processes = json.load(fh).get("processes") or []
            except (OSError, ValueError):
                pass
        if self._task_pid is not None:
            processes.append([self._task_pid, self._task_start])
        cgroups = [c for c in (self.containment.get("cgroup"), self.containment.get("memory_cgroup")) if c]
        sup.kill_recorded(processes, cgroups)
        for path in cgroups:
            sup.cgroup_remove(path)
        if record:
            with contextlib.suppress(OSError):
                os.unlink(record)

    def running(self):
        return self.poll() is None

    def sample(self, now=None):
        """A fresh usage sample of the whole process tree (zeros if never started)."""
        if self.sampler is None:
            return {"max_rss": 0, "cpu_percent": 0.0}
        if self._outcome is None:
            self.sampler.sample(now)
        return self.usage()

    def usage(self):
        """The latest usage in the contract's shape."""
        if self.sampler is None:
            return {"max_rss": 0, "cpu_percent": 0.0}
        usage = self.sampler.usage()
        figures = {"max_rss": usage["max_rss"], "cpu_percent": usage["cpu_percent"]}
        peak = (self.result or {}).get("peak_memory")
        if peak is not None:
            # The memory cgroup's peak: it also sees what lived between two samples.
            figures["peak_memory"] = int(peak)
            figures["memory_limit"] = int(self.containment.get("memory_limit") or 0)
        return figures

    def read_progress(self):
        """The task's latest ``{"fraction", "message"}``, or None."""
        return read_last_progress(self.progress_path)

    def output_written(self):
        """Bytes the task has written so far to (stdout, stderr)."""
        return tuple(getattr(self.outputs.get(stream), "written", 0) for stream in ("stdout", "stderr"))

    def live_tail(self, stream, limit):
        """The last `limit` bytes of `stream` written so far, without waiting for the task."""
        output = self.outputs.get(stream)
        try:
            return output.tail(limit) if output is not None else b""
        except OSError:
            return b""

    def tail(self, stream, limit=OUTPUT_LIMIT):
        """The last ``limit`` bytes of ``stream`` ("stdout" or "stderr") as text."""
        return self.tail_bytes(stream, limit).decode("utf-8", errors="replace")

    def tail_bytes(self, stream, limit=OUTPUT_LIMIT):
        """The last ``limit`` bytes of ``stream``, as the task wrote them (they
        need not be text). Waits a little for the pipe to be drained once the
        task has exited."""
        output = self.outputs.get(stream)
        if output is None:
            return (self.start_error or "").encode() if stream == "stderr" else b""
        if not output.wait(OUTPUT_DRAIN_TIMEOUT):
            log.warning("task %s: something still holds its %s open; sending what was read", self.task_id, stream)
        try:
            return output.tail(limit)
        except OSError:
            return b""

    # -- stopping ---------------------------------------------------------

    def terminate(self, grace, reason=None, wait=True):
        """SIGTERM every process of the task, SIGKILL them after ``grace`` seconds.

        ``reason`` ("cancelled", "timeout") becomes the outcome unless the
        task had already exited. With ``wait=False`` it returns at once
        and ``poll()`` does the SIGKILL when the grace period is over. A
        second call never extends an earlier deadline.
        """
        if self._outcome is not None or self.popen is None:
            return
        if self.popen.poll() is None and self.stop_reason is None:
            self.stop_reason = reason or Ended.FAILURE.value
        if self.kill_deadline is None:
            grace = max(0.0, float(grace))
            log.info("task %s: SIGTERM to its processes (SIGKILL in %gs)", self.task_id, grace)
            self.kill_deadline = time.monotonic() + grace
            self._send("term")
        if not wait:
            return
        while self.poll() is None:
            time.sleep(0.02)

    def kill(self):
        """SIGKILL every process of the task now."""
        if self.popen is None or self._outcome is not None:
            return
        if self.stop_reason is None and self.popen.poll() is None:
            self.stop_reason = Ended.FAILURE.value
        if self._kill_sent is None:
            log.info("task %s: SIGKILL to its processes", self.task_id)
            self._kill_sent = time.monotonic()
        if not self._send("kill") and self.popen.poll() is None:
            self.popen.kill()  # it cannot hear us: poll() kills what it leaves


# -- the spawner -------------------------------------------------------------


class SpawnedSupervisor:
    """A supervisor forked by the spawner, with the parts of ``Popen`` a
    ``TaskProcess`` uses. It is not our child: it has exited once its status
    pipe hangs up (it holds the only write end)."""

    def __init__(self, pid, control_w, status_r):
        self.pid = pid
        self.stdin = os.fdopen(control_w, "wb", buffering=0)
        self.stdout = os.fdopen(status_r, "rb", buffering=0)
        self.returncode = None

    def _hung_up(self, timeout_ms):
        if self.stdout.closed:
            return True  # let go of (Standby.dismiss): nothing more to know
        poller = select.poll()
        poller.register(self.stdout.fileno(), select.POLLHUP)
        return any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll(timeout_ms))

    def poll(self):
        if self.returncode is None and self._hung_up(0):
            self.returncode = 0  # its exit status belongs to the spawner
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("supervisor %d" % self.pid, timeout)
            self._hung_up(-1 if left is None else max(1, int(left * 1000)))
        return self.returncode

    def kill(self):
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Spawner:
    """A small process that starts each attempt's supervisor (``spawner.py``):
    a fork (~1 ms), or none when a supervisor of an earlier attempt is free,
    instead of a new interpreter's ~20 ms of CPU. The attempt's pipes and
    output files travel to it as file descriptors over a Unix socket.
    Started again if it dies."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._sock = None

    def _start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(SPAWNER, stdin=theirs, close_fds=True, start_new_session=True)
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT)
        self._sock = ours

    def spawn(self, out_fd, err_fd):
        """A new supervisor with the output files ``out_fd`` and ``err_fd``."""
        control_r, control_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            with self._lock:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                socket.send_fds(self._sock, [b"spawn"], [control_r, status_w, out_fd, err_fd])
                answer = self._sock.recv(64)
            pid = int.from_bytes(answer, "big") if len(answer) == 8 else 0
            if not pid:
                raise OSError("the spawner did not start a supervisor")
        except BaseException:
            os.close(control_w)
            os.close(status_r)
            raise
        finally:
            os.close(control_r)
            os.close(status_w)
        return SpawnedSupervisor(pid, control_w, status_r)

    def close(self):
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


# -- orphans ---------------------------------------------------------------


def become_subreaper():
    """Make this process the child subreaper of everything it starts (Linux).

    A task's background children outlive its shell; once the shell is gone
    they are re-parented to the nearest subreaper instead of to PID 1, so
    the worker can reap them when they die. Without it, in a container whose
    PID 1 never calls wait(), every killed task would leave zombies behind
    (and its process group would never quite disappear). Only the
    ``banyan-worker`` process does this: a process that embeds a Worker may
    have children of its own. Returns True when it worked.
    """
    return sup.become_subreaper()


def reap_orphans(keep=()):
    """Reap this process's dead children except ``keep`` (pids a ``Popen`` reaps itself).

    Returns how many were reaped. Cheap when there is nothing to reap: one
    ``waitid`` that looks without reaping.
    """
    try:
        first = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return 0
    if first is None:
        return 0
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return 0
    reaped = 0
    for child in children:
        if child.pid in keep:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            pid, _ = os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            continue
        if pid:
            reaped += 1
            log.debug("reaped orphan %s", pid)
    return reaped
