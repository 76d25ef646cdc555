"""Running one attempt of a task as a process group.

Each attempt gets its own session (``start_new_session=True``) so that
SIGTERM/SIGKILL reach every process the command spawned, not just the
shell. Output goes to files in a per-attempt directory, never to pipes, so a
chatty task cannot block on a full pipe while the worker is busy elsewhere.
"""

import contextlib
import ctypes
import errno
import logging
import os
import signal
import subprocess
import time
from collections import namedtuple

import psutil

from .progress import PROGRESS_ENV, read_last_progress
from .resources import ProcessTreeSampler

log = logging.getLogger(__name__)

__all__ = ["Outcome", "TaskProcess", "OUTPUT_LIMIT", "become_subreaper", "reap_orphans"]

#: How much of each stream is sent to the server (the server keeps the same cap).
OUTPUT_LIMIT = 1024 * 1024

#: prctl(2) option: orphaned descendants are re-parented to us, not to init.
PR_SET_CHILD_SUBREAPER = 36

#: ``exit_code`` is the process's return code (negative: killed by signal -N),
#: or None when the command could not be started at all. ``outcome`` is one of
#: "success", "failure", "timeout", "cancelled".
Outcome = namedtuple("Outcome", "exit_code outcome")


class TaskProcess:
    """One attempt of a task: start it, watch it, stop it, read what it wrote.

    ``task`` is the task document as returned by a claim. ``extra_env`` is
    added after the task's own environment (the worker uses it for
    CUDA_VISIBLE_DEVICES).
    """

    def __init__(self, task, attempt, attempt_dir, extra_env=None):
        self.task = task
        self.task_id = str(task.get("_id"))
        self.attempt = attempt
        self.attempt_dir = os.fspath(attempt_dir)
        self.extra_env = dict(extra_env or {})
        self.stdout_path = os.path.join(self.attempt_dir, "stdout")
        self.stderr_path = os.path.join(self.attempt_dir, "stderr")
        self.progress_path = os.path.join(self.attempt_dir, "progress")
        self.popen = None
        self.pgid = None
        self.sampler = None
        self.started = None            # time.monotonic() at start
        self.stop_reason = None        # outcome to report if we stopped it
        self.kill_deadline = None      # monotonic time for SIGKILL after SIGTERM
        self.start_error = None        # why the attempt could not even get its files
        self.reservation = None        # the worker's record of what this attempt holds
        self._outcome = None

    # -- starting ---------------------------------------------------------

    @property
    def pid(self):
        return self.popen.pid if self.popen is not None else None

    @property
    def max_shutdown_time(self):
        value = self.task.get("max_shutdown_time")
        return 10.0 if value is None else float(value)

    def environment(self):
        """os.environ + the task's ``environment`` + Banyan's own variables."""
        env = dict(os.environ)
        for name, value in (self.task.get("environment") or {}).items():
            env[str(name)] = "" if value is None else str(value)
        env.update(self.extra_env)
        env["BANYAN_TASK_ID"] = self.task_id
        env["BANYAN_ATTEMPT"] = str(self.attempt)
        env[PROGRESS_ENV] = self.progress_path
        return env

    def start(self):
        """Start the command; a command that cannot start becomes a failed outcome, not an exception."""
        self.started = time.monotonic()
        with contextlib.ExitStack() as files:
            try:
                os.makedirs(self.attempt_dir, exist_ok=True)
                open(self.progress_path, "a").close()
                out = files.enter_context(open(self.stdout_path, "wb"))
                err = files.enter_context(open(self.stderr_path, "wb"))
            except OSError as exc:  # disk full, permissions, no file descriptors left
                self.start_error = (f"banyan-worker: cannot prepare {self.attempt_dir} "
                                    f"for task {self.task_id}: {exc}\n")
                log.error("task %s attempt %s: %s", self.task_id, self.attempt, self.start_error.strip())
                self._outcome = Outcome(None, "failure")
                return
            self._start_command(out, err)

    def _start_command(self, out, err):
        command = self.task.get("command")
        if command is None or command == [] or command == "":
            # A barrier; the server normally finishes these itself.
            self._outcome = Outcome(0, "success")
            return
        if isinstance(command, str):
            args = ["/bin/sh", "-c", command]
        else:
            args = [str(part) for part in command]
        cwd = self.task.get("working_directory") or None
        if cwd:
            cwd = os.path.expanduser(cwd)
        try:
            self.popen = subprocess.Popen(
                args, cwd=cwd, env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True)
        except (OSError, ValueError) as exc:
            err.write(f"banyan-worker: cannot start task {self.task_id}: {exc}\n".encode())
            log.warning("task %s attempt %s failed to start: %s", self.task_id, self.attempt, exc)
            self._outcome = Outcome(None, "failure")
            return
        # With start_new_session the child is the leader of its own group.
        self.pgid = self.popen.pid
        self.sampler = ProcessTreeSampler(self.popen.pid)
        log.info("task %s attempt %s started as pid %s", self.task_id, self.attempt, self.pgid)

    # -- watching ---------------------------------------------------------

    def poll(self, now=None):
        """None while running, else the ``Outcome`` (computed once).

        Also escalates to SIGKILL once a pending termination's grace period
        is over, so the caller only has to keep polling.
        """
        if self._outcome is not None:
            return self._outcome
        now = time.monotonic() if now is None else now
        code = self.popen.poll()
        if code is None:
            if self.kill_deadline is not None and now >= self.kill_deadline:
                self.kill()
            return None
        # The leader is gone; don't leave its children running without accounting.
        if self._group_alive():
            log.info("task %s: leader exited, killing leftover processes of group %s", self.task_id, self.pgid)
            self._signal_group(signal.SIGKILL)
        if self.stop_reason is not None:
            outcome = self.stop_reason
        else:
            outcome = "success" if code == 0 else "failure"
        self._outcome = Outcome(code, outcome)
        log.info("task %s attempt %s exited with %s (%s)", self.task_id, self.attempt, code, outcome)
        return self._outcome

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
        return {"max_rss": usage["max_rss"], "cpu_percent": usage["cpu_percent"]}

    def read_progress(self):
        """The task's latest ``{"fraction", "message"}``, or None."""
        return read_last_progress(self.progress_path)

    def tail(self, stream, limit=OUTPUT_LIMIT):
        """The last ``limit`` bytes of ``stream`` ("stdout" or "stderr") as text."""
        path = {"stdout": self.stdout_path, "stderr": self.stderr_path}[stream]
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - limit))
                data = fh.read(limit)
        except OSError:
            return (self.start_error or "") if stream == "stderr" else ""
        return data.decode("utf-8", errors="replace")

    # -- stopping ---------------------------------------------------------

    def terminate(self, grace, reason=None, wait=True):
        """SIGTERM the group, SIGKILL it after ``grace`` seconds if anything is left.

        ``reason`` ("cancelled", "timeout") becomes the outcome unless the
        process had already exited. With ``wait=False`` it returns at once
        and ``poll()`` does the SIGKILL when the grace period is over. A
        second call never extends an earlier deadline.
        """
        if self._outcome is not None or self.popen is None:
            return
        if self.popen.poll() is None and self.stop_reason is None:
            self.stop_reason = reason or "failure"
        if self.kill_deadline is None:
            grace = max(0.0, float(grace))
            log.info("task %s: SIGTERM to group %s (SIGKILL in %gs)", self.task_id, self.pgid, grace)
            self.kill_deadline = time.monotonic() + grace
            self._signal_group(signal.SIGTERM)
        if not wait:
            return
        while self.poll() is None or self._group_alive():
            self._reap_group_zombies()
            if not self._group_alive() and self.poll() is not None:
                break
            if time.monotonic() >= self.kill_deadline:
                self.kill()
                self.popen.wait()
                self.poll()
                break
            time.sleep(0.05)

    def kill(self):
        """SIGKILL the whole group now."""
        if self.popen is None:
            return
        log.info("task %s: SIGKILL to group %s", self.task_id, self.pgid)
        if self.stop_reason is None and self.popen.poll() is None:
            self.stop_reason = "failure"
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum):
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            pass  # ESRCH: everything is already gone
        except PermissionError as exc:  # EPERM: pgid reused by someone else's group
            log.warning("cannot signal group %s: %s", self.pgid, exc)

    def _reap_group_zombies(self):
        """Reap dead members of the group that were re-parented to us (see ``become_subreaper``)."""
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return
        for child in children:
            if child.pid == self.pid:
                continue  # the leader is the Popen's to reap
            try:
                if child.status() == psutil.STATUS_ZOMBIE and os.getpgid(child.pid) == self.pgid:
                    os.waitpid(child.pid, os.WNOHANG)
            except (psutil.Error, OSError):
                continue

    def _group_alive(self):
        """True while any process (other than an unreaped leader) is left in the group."""
        if self.pgid is None:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        except OSError as exc:  # pragma: no cover
            return exc.errno != errno.ESRCH
        return True


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
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


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
