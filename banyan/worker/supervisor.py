"""The supervisor of one attempt: a small process between the worker and the task.

The worker's spawner (``spawner.py``, one per worker) forks one ahead of an
attempt, or hands the attempt to one whose earlier attempt is over and left
nothing (``Supervisor.release``); without a spawner the worker starts one
(``python -I -S``, ``import supervisor``: built-in modules and ctypes only,
no json or re, so it starts in ~15 ms of CPU). The worker talks to it
through a pipe each way. The supervisor:

- becomes a child subreaper, so every process the task starts stays in its
  subtree, even ``setsid`` and double-fork daemons, whose parents exit;
- starts the task in a session of its own, inside the attempt's cgroups when
  the worker gave some (v2 for containment, v1/v2 memory for the limit), with
  the CPU affinity it was given: without a cgroup by ``posix_spawn`` (no copy
  of this process), into a cgroup v2 by a fork born in it (clone3), not by
  a move after the fork, which waits for the kernel (see ``start``);
- holds a lease: a deadline on the machine's monotonic clock that the worker
  moves forward after every heartbeat the server acknowledged. When the lease
  runs out (the worker is frozen, or cut off from the server) it kills the
  task's whole tree on its own, before the server may give the task to
  another worker. No clocks of two machines are ever compared;
- ends the task's whole tree when the task's main process exits, when the
  worker says ``kill``, and when the worker is gone (end of file on stdin:
  the worker exited or was killed with SIGKILL);
- records the pids of the tree with their start times (``record``), so a
  worker started after a crash of this one and of its worker kills what is
  left, and never a process that merely got a recycled pid.

Protocol. Worker -> supervisor: first the spec (see ``Supervisor.__init__``)
as 8 bytes of length (big-endian) and a ``marshal`` dump, then one line each:
``lease <monotonic deadline>``, ``term`` (SIGTERM to every process of the
tree) or ``kill``. Supervisor -> worker, on
stdout: ``started <pid>`` or ``error <message>``, and at the end ``result
<json>`` with ``exit_code`` (negative: killed by signal), ``oom``,
``peak_memory`` and ``lease_expired``.

The helpers at module level (``start_time``, ``descendants``, ``kill_tree``,
``kill_recorded``, cgroup helpers) are also what the worker uses to clean up.
"""

import ctypes
import errno
import marshal
import os
import select
import signal
import sys
import time

#: prctl(2): orphaned descendants are re-parented to us, not to init.
PR_SET_CHILD_SUBREAPER = 36
#: Seconds between scans of the tree for new processes to record (no cgroup).
SCAN_INTERVAL = 0.5
#: Longest the supervisor waits for a killed tree to disappear before it
#: reports anyway (a process stuck in uninterruptible sleep).
KILL_WAIT = 10.0
#: Signals the task gets back to their default disposition.
RESET_SIGNALS = ("SIGPIPE", "SIGXFSZ", "SIGCHLD", "SIGTERM", "SIGINT", "SIGHUP")
#: clone3(2) (the same number on every architecture) and its flag that
#: starts the child inside a cgroup v2 (Linux >= 5.7).
SYS_CLONE3 = 435
CLONE_INTO_CGROUP = 0x200000000


# == processes ================================================================


def start_time(pid):
    """The process's start time in clock ticks since boot, or None if it is gone.

    A pid with its start time names one process for good: a recycled pid has
    another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses.
    fields = data[data.rfind(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None  # a zombie is already dead
    return int(fields[19])


def children(pid):
    """Direct children of ``pid`` (every thread's), from /proc."""
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found += [int(k) for k in fh.read().split()]
        except (OSError, ValueError):
            continue
    return found


def descendants(pid):
    """Every live descendant of ``pid``, parents before children."""
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop(0))
        found += kids
        todo += kids
    return found


def reaped():
    """Each dead child of this process, reaped: (pid, wait status); no waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def become_subreaper():
    """Make this process the child subreaper of its descendants; True if it worked."""
    try:
        return libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


_LIBC = None


def libc():
    """The C library, loaded once per process: a reused supervisor makes
    these calls for every attempt. ``PyDLL``: its calls keep the GIL (see
    ``fork_into_cgroup``); ``syscall`` answers a C long."""
    global _LIBC
    if _LIBC is None:
        loaded = ctypes.PyDLL(None, use_errno=True)
        loaded.syscall.restype = ctypes.c_long
        _LIBC = loaded
    return _LIBC


def signal_pids(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def kill_recorded(processes, cgroups=(), attempts=20):
    """SIGKILL the recorded ``[[pid, start time], ...]`` that are still the
    same processes, their descendants, and everything in ``cgroups``; True
    when nothing is left. Used by a worker for what a dead supervisor left."""
    for _ in range(attempts):
        live = [pid for pid, started in processes if started is not None and start_time(pid) == started]
        victims = set(live)
        for pid in live:
            victims.update(descendants(pid))
        for path in cgroups:
            victims.update(cgroup_pids(path))
            cgroup_kill(path)
        victims.discard(os.getpid())
        victims = {pid for pid in victims if start_time(pid) is not None}
        if not victims:
            return True
        signal_pids(victims, signal.SIGKILL)
        time.sleep(0.05)
    return False


# == cgroups ==================================================================


def cgroup_pids(path):
    """Pids in a cgroup (v1 or v2), empty when it is gone."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as fh:
            return [int(line) for line in fh.read().split()]
    except (OSError, ValueError):
        return []


def cgroup_kill(path):
    """Kill everything in a cgroup: ``cgroup.kill`` (v2, Linux >= 5.14) takes
    forks in flight too; elsewhere SIGKILL each member."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as fh:
            fh.write("1")
        return
    except OSError:
        pass
    signal_pids(cgroup_pids(path), signal.SIGKILL)


def cgroup_remove(path):
    """Remove an empty cgroup; True once it is gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def read_int(path, key=None):
    """An integer file, or the ``key value`` line of a flat-keyed file; None if unreadable."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    try:
        if key is None:
            text = text.strip()
            return None if text == "max" else int(text)
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except ValueError:
        return None
    return None


class CloneArgs(ctypes.Structure):
    """``struct clone_args`` of clone3(2), up to ``cgroup`` (its version 2)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


def fork_into_cgroup(path):
    """``os.fork()`` whose child is born inside the cgroup v2 ``path``
    (clone3 with CLONE_INTO_CGROUP): 0 in the child, its pid in the parent;
    OSError when the kernel cannot (older than 5.7, or the cgroup refuses).

    Moving a process into a cgroup after its fork (writing
    ``cgroup.procs``) waits for an RCU grace period, 10-20 ms per task on
    a machine with little else moving between cgroups; a child born in
    it costs no more than a fork. The calls around the system call are
    those ``os.fork`` makes (the interpreter's locks, at-fork hooks); ctypes'
    ``PyDLL`` keeps the GIL through it, as ``os.fork``'s C code does."""
    syscall, api = libc().syscall, ctypes.pythonapi
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    args = CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=fd)
    number, pointer, size = ctypes.c_long(SYS_CLONE3), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))
    api.PyOS_BeforeFork()
    pid = syscall(number, pointer, size)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0  # `fd` is close-on-exec
    error = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    os.close(fd)
    if pid < 0:
        raise OSError(error, "clone3 into %s: %s" % (path, os.strerror(error)))
    return pid


def find_program(name, env):
    """The file ``execvpe`` would run for ``name`` with ``env``'s PATH (relative
    to the current directory); OSError as execvpe's: the first error other
    than "not here" wins."""
    if os.path.dirname(name):
        return name
    denied = None
    for directory in (env.get("PATH") or os.defpath).split(os.pathsep):
        path = os.path.join(directory, name)
        try:
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
        except (OSError, ValueError):
            continue
        if denied is None and os.path.exists(path):
            denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    raise denied or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def write_file(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def to_json(value):
    """JSON of what the supervisor writes (numbers, booleans, None, strings,
    lists, dicts), without importing json (and re): it starts faster."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(c if c >= " " and c not in '"\\' else "\\u%04x" % ord(c) for c in value)
        return '"' + escaped + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(to_json(str(k)) + ": " + to_json(v) for k, v in value.items()) + "}"
    return "[" + ", ".join(to_json(v) for v in value) + "]"


class LentToTask:
    """What a task inherits from its supervisor at its spawn or fork, set on
    this process on entry and put back on exit, since the supervisor takes
    the next attempt as it was: its directory and CPU affinity; the
    inheritance of every descriptor above 2 cut (only the task's 0, 1 and 2
    cross its exec); with ``reset_ignored``, the signals of
    ``RESET_SIGNALS`` that this process ignores back at their default (an
    exec keeps an ignored signal ignored; one it catches, it resets)."""

    def __init__(self, spec, reset_ignored=False):
        self.spec = spec
        self.reset_ignored = reset_ignored
        self.affinity = self.here = None
        self.ignored = []

    def __enter__(self):
        spec = self.spec
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2:
                try:
                    os.set_inheritable(int(name), False)
                except OSError:
                    pass
        try:
            if spec.get("cpus"):
                self.affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, spec["cpus"])
            if spec.get("cwd"):
                self.here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                os.chdir(spec["cwd"])
        except BaseException:
            self.__exit__()
            raise
        if self.reset_ignored:
            for name in RESET_SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None and signal.getsignal(signum) == signal.SIG_IGN:
                    signal.signal(signum, signal.SIG_DFL)
                    self.ignored.append(signum)
        return self

    def __exit__(self, *exc_info):
        for signum in self.ignored:
            signal.signal(signum, signal.SIG_IGN)
        if self.affinity is not None:
            os.sched_setaffinity(0, self.affinity)
        if self.here is not None:
            os.fchdir(self.here)
            os.close(self.here)


# == the supervisor ===========================================================


class Supervisor:
    """One attempt. ``spec`` (from the worker):

    - ``args``, ``env``, ``cwd``: the command, exec'd in a new session;
    - ``stdout_fd``, ``stderr_fd``: inherited descriptors of the output files;
    - ``lease``: monotonic deadline, or None for no lease;
    - ``cgroup``: a v2 cgroup directory to create and run the task in, or None;
    - ``memory_cgroup``: a memory cgroup directory (v1 or v2), or None;
      ``memory_version`` 1 or 2; ``memory_limit`` bytes, or None;
    - ``cpus``: CPU ids for the task's affinity, or None;
    - ``record``: file to keep the tree's pids and start times in, or None.
    """

    def __init__(self, spec, control_fd=0, status_fd=1):
        self.spec = spec
        self.control_fd = control_fd
        self.status_fd = status_fd
        self.lease = spec.get("lease")
        self.cgroups = list(dict.fromkeys(p for p in (spec.get("cgroup"), spec.get("memory_cgroup")) if p))
        self.pid = None
        self.exit_code = None
        self.lease_expired = False
        self.killing = False
        self.asked = False  # the worker asked to stop the task ("term"/"kill")
        self.stopped = False  # ... before the task exited on its own
        self.buffer = b""
        self.recorded = {}
        self.worker_gone = False
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    # -- talking to the worker --------------------------------------------

    def say(self, line):
        try:
            os.write(self.status_fd, (line + "\n").encode())
        except OSError:
            pass  # the worker is gone; the result is still in `record`'s absence

    def read_commands(self):
        """Commands waiting on stdin; end of file means the worker is gone."""
        try:
            data = os.read(self.control_fd, 65536)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self.worker_gone = True
            return ["kill"]
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in lines if line.strip()]

    def apply(self, command):
        name, _, arg = command.partition(" ")
        if name == "lease":
            self.lease = float(arg)
        elif name == "term":
            self.asked = True
            self.signal_tree(signal.SIGTERM)
        elif name == "kill":
            self.asked = True
            self.kill_tree()

    # -- the tree ---------------------------------------------------------

    def tree(self):
        """Every live process of the task: our descendants, and the cgroups' members."""
        pids = set(descendants(os.getpid()))
        for path in self.cgroups:
            pids.update(cgroup_pids(path))
        pids.discard(os.getpid())
        return {pid for pid in pids if start_time(pid) is not None}

    def signal_tree(self, signum):
        if self.pid is not None and self.exit_code is None:  # unreaped: its pgid cannot be reused
            try:
                os.killpg(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        signal_pids(self.tree(), signum)

    def kill_tree(self):
        self.killing = True
        if self.spec.get("cgroup"):
            cgroup_kill(self.spec["cgroup"])
        self.signal_tree(signal.SIGKILL)

    def reap(self):
        """Reap every dead child (ours and adopted orphans); note the task's exit."""
        for pid, status in reaped():
            if pid == self.pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                self.stopped = self.asked

    def record(self):
        """Keep the tree's pids and start times on disk (atomically), when it
        grew. In a cgroup, where nothing of the tree can leave, the task's
        own pid is enough beside the cgroup: no walk of the tree."""
        path = self.spec.get("record")
        if not path:
            return
        changed = False
        for pid in [self.pid] if self.spec.get("cgroup") else self.tree():
            if pid not in self.recorded:
                started = start_time(pid)
                if started is not None:
                    self.recorded[pid] = started
                    changed = True
        if not changed and os.path.exists(path):
            return
        doc = {
            "supervisor": [os.getpid(), start_time(os.getpid())],
            "processes": [[pid, started] for pid, started in self.recorded.items()],
            "cgroups": self.cgroups,
        }
        tmp = path + ".tmp"
        write_file(tmp, to_json(doc))
        os.replace(tmp, path)

    # -- cgroups ----------------------------------------------------------

    def make_cgroups(self):
        for path in self.cgroups:
            os.makedirs(path, exist_ok=True)
        limit = self.spec.get("memory_limit")
        memory = self.spec.get("memory_cgroup")
        if memory and limit:
            if self.spec.get("memory_version") == 2:
                write_file(os.path.join(memory, "memory.max"), str(int(limit)))
                try:  # no swap: over its memory, the task is killed, not swapped out
                    write_file(os.path.join(memory, "memory.swap.max"), "0")
                except OSError:
                    pass
            else:
                write_file(os.path.join(memory, "memory.limit_in_bytes"), str(int(limit)))
                try:
                    write_file(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(int(limit)))
                except OSError:
                    pass  # no swap accounting on this kernel

    def memory_figures(self):
        """``(oom kills, peak bytes)`` of the memory cgroup, or (0, None)."""
        memory = self.spec.get("memory_cgroup")
        if not memory:
            return 0, None
        if self.spec.get("memory_version") == 2:
            kills = read_int(os.path.join(memory, "memory.events"), "oom_kill") or 0
            peak = read_int(os.path.join(memory, "memory.peak"))
        else:
            kills = read_int(os.path.join(memory, "memory.oom_control"), "oom_kill") or 0
            peak = read_int(os.path.join(memory, "memory.max_usage_in_bytes"))
        return kills, peak

    # -- starting the task ------------------------------------------------

    def start(self):
        """Start the task; the message of a failure, or None.

        Without a cgroup, ``posix_spawn`` (a vfork: the task's exec comes
        ~1 ms after, where a fork of this process takes several and copies
        it); into its one cgroup v2, a fork born in it (``fork_into_cgroup``);
        else a fork that joins its cgroups before its exec. Either way this
        process lends the task what it inherits (``LentToTask``), so that a
        forked child runs as little Python as it can: each object it touches
        copies a page of this process."""
        try:
            if not self.cgroups:
                self.pid = self._spawn()
                return None
            return self._fork_exec()
        except (OSError, ValueError, TypeError) as exc:  # as the fork's child reports any
            return str(exc) or type(exc).__name__

    def _spawn(self):
        """``posix_spawn`` the task; its pid."""
        spec = self.spec
        with LentToTask(spec):
            return os.posix_spawn(
                find_program(spec["args"][0], spec["env"]),
                spec["args"],
                spec["env"],
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, spec["stdout_fd"], 1),
                    (os.POSIX_SPAWN_DUP2, spec["stderr_fd"], 2),
                ],
                setsid=True,
                setsigdef=[getattr(signal, name) for name in RESET_SIGNALS if hasattr(signal, name)],
            )

    def _born_in(self):
        """The cgroup v2 the task can be born in: its only cgroup, if v2."""
        if len(self.cgroups) == 1 and (
            self.cgroups[0] == self.spec.get("cgroup") or self.spec.get("memory_version") == 2
        ):
            return self.cgroups[0]
        return None

    def _fork_exec(self):
        """Fork and exec the task; the message of a failure, or None."""
        spec = self.spec
        err_r, err_w = os.pipe()  # close-on-exec: empty at EOF means exec worked
        null = os.open(os.devnull, os.O_RDONLY)  # close-on-exec too: its copy on 0 crosses
        try:
            with LentToTask(spec, reset_ignored=True):
                program = find_program(spec["args"][0], spec["env"])
                pid, born_in = None, self._born_in()
                if born_in is not None:
                    try:
                        pid = fork_into_cgroup(born_in)
                    except OSError:
                        born_in = None  # an older kernel: the child joins it after the fork
                if pid is None:
                    pid = os.fork()
                if pid == 0:  # pragma: no cover (child): no more Python than it takes
                    try:
                        os.setsid()
                        for path in self.cgroups if born_in is None else ():
                            write_file(os.path.join(path, "cgroup.procs"), "0")
                        os.dup2(null, 0)
                        os.dup2(spec["stdout_fd"], 1)
                        os.dup2(spec["stderr_fd"], 2)
                        os.execve(program, spec["args"], spec["env"])
                    except BaseException as exc:  # noqa: BLE001 - anything is reported, then exit
                        try:
                            os.write(err_w, str(exc).encode() or type(exc).__name__.encode())
                        finally:
                            os._exit(127)
        except BaseException:
            os.close(err_r)
            raise
        finally:
            os.close(null)
            os.close(err_w)
        self.pid = pid
        message = b""
        while True:
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            message += chunk
        os.close(err_r)
        if message:
            os.waitpid(pid, 0)
            self.pid = None
            return message.decode(errors="replace")
        return None

    # -- the loop ---------------------------------------------------------

    def run(self):
        become_subreaper()
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        # The worker's own stop signals come as commands; a signal sent to us
        # (the machine shutting down) ends the task as the worker's exit would.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *a: self.kill_tree())
        try:
            self.make_cgroups()
            failure = self.start()
        except OSError as exc:
            failure = f"cannot prepare the task's cgroup: {exc}"
        if failure is not None:
            self.say("error " + failure.replace("\n", " "))
            self.cleanup()
            return 127
        self.say(f"started {self.pid}")
        self.record()
        os.set_blocking(self.control_fd, False)
        # In a cgroup nothing escapes: the record needs no more than the cgroup.
        scan_interval = float("inf") if self.spec.get("cgroup") else SCAN_INTERVAL
        next_scan = time.monotonic() + scan_interval
        kill_started = None
        while True:
            self.reap()
            now = time.monotonic()
            if self.exit_code is not None and not self.killing:
                self.kill_tree()  # the task is over: so is everything it started
            if self.lease is not None and now >= self.lease and not self.lease_expired:
                self.lease_expired = True
                self.kill_tree()
            if self.killing:
                kill_started = kill_started or now
                if self.exit_code is not None and not self.tree():
                    break
                if now - kill_started > KILL_WAIT:
                    break
                self.kill_tree()  # what forked meanwhile
            if now >= next_scan:
                self.record()
                next_scan = now + scan_interval
            timeout = min(next_scan - now, 60.0)
            if self.killing:
                timeout = 0.02
            elif self.lease is not None:
                timeout = min(timeout, max(0.0, self.lease - now))
            try:
                ready, _, _ = select.select([self.control_fd, self.wake_r], [], [], max(0.0, timeout))
            except InterruptedError:
                continue
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            if self.control_fd in ready and not self.worker_gone:
                for command in self.read_commands():
                    self.apply(command)
        kills, peak = self.memory_figures()
        result = {
            "exit_code": self.exit_code,
            "oom": kills > 0,
            "peak_memory": peak,
            "lease_expired": self.lease_expired,
            "worker_gone": self.worker_gone,
            "stopped": self.stopped,
        }
        self.say("result " + to_json(result))
        self.cleanup()
        return 0

    def release(self):
        """Undo what ``run`` did to this process and close the attempt's
        output files (its pipes to the worker are the caller's to close,
        see ``spawner.supervise_attempts``). True if this process may
        supervise another attempt: the worker is there, and nothing of the
        task is left."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        self.reap()  # the killed tree's zombies: they would outlive the attempt
        reusable = not self.worker_gone and not self.tree()
        for fd in (self.spec.get("stdout_fd"), self.spec.get("stderr_fd"), self.wake_r, self.wake_w):
            if fd is not None:
                os.close(fd)
        return reusable

    def cleanup(self):
        for path in self.cgroups:
            cgroup_remove(path)
        if self.spec.get("record"):
            try:
                os.unlink(self.spec["record"])
            except OSError:
                pass


def read_spec(fd):
    """The spec on ``fd`` (length, then marshal dump), and whatever came after
    it; None when ``fd`` ends before any byte (an idle supervisor let go)."""
    data = b""
    while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "big"):
        chunk = os.read(fd, 65536)
        if not chunk:
            if not data:
                return None
            raise SystemExit("banyan supervisor: no task spec on stdin")
        data += chunk
    size = 8 + int.from_bytes(data[:8], "big")
    return marshal.loads(data[8:size]), data[size:]


def main():
    read = read_spec(0)
    if read is None:
        return 0  # started ahead of time and never given a task
    spec, rest = read
    supervisor = Supervisor(spec)
    supervisor.buffer = rest  # the worker sends nothing more before "started"
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
