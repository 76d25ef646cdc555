"""A worker's spawner: the small process that starts each attempt's supervisor.

The worker starts it once (``python -I -S``, like a supervisor) and asks it,
over a Unix socket, for a supervisor per attempt; the attempt's control and
status pipes and output files travel as descriptors (``Spawner`` in
``executor.py`` is the worker's side). A supervisor is forked from here (~1 ms,
where a new interpreter costs ~20 ms of CPU) and, once its attempt is over and
nothing of its task is left, waits for the next one instead of exiting.
"""

import os
import signal
import socket

if __package__:  # imported as banyan.worker.spawner
    from .supervisor import Supervisor, read_spec, reaped
else:  # run by the worker as `import spawner`, beside supervisor.py (no site packages)
    from supervisor import Supervisor, read_spec, reaped  # type: ignore[no-redef]

#: Idle supervisors a spawner keeps for later attempts; more are let go.
IDLE_SUPERVISORS = 4


def _reap_children(*unused):
    for _ in reaped():
        pass


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def supervise_attempts(link, fds):
    """A forked supervisor's life: the attempt on ``fds`` (control, status,
    stdout, stderr), then, while nothing of its task is left, the next ones
    the spawner hands it over ``link``. It says ``idle`` on ``link`` before
    it closes the attempt's status pipe, so the spawner knows it is free
    before the worker asks for another supervisor. Ends when the spawner
    lets it go or is gone."""
    while True:
        control, status, out, err = fds
        read = read_spec(control)
        reusable = True  # let go before its task: nothing ran
        if read is not None:
            spec, rest = read
            spec["stdout_fd"], spec["stderr_fd"] = out, err
            supervisor = Supervisor(spec, control, status)
            supervisor.buffer = rest
            supervisor.run()
            reusable = supervisor.release()
        else:
            close_fds((out, err))
        try:
            if reusable:
                link.send(b"idle")
        except OSError:
            reusable = False
        close_fds((status, control))
        if not reusable:
            return 0
        try:
            message, fds, _, _ = socket.recv_fds(link, 64, 4)
        except OSError:
            return 0
        if not message or len(fds) != 4:
            close_fds(fds)
            return 0


class Supervisors:
    """A spawner's supervisors, each linked to it by a socket pair: busy
    with an attempt, or idle, waiting on its link for the next one.

    An idle one takes an attempt before a fork is made: reused, an attempt
    costs no fork, no exit, and none of the copy-on-write faults of a
    forked interpreter (~2 ms of CPU, a fifth of a short task's whole
    cost). A supervisor is reused only once its task's whole tree is gone
    (``Supervisor.release``), so it never holds two attempts' processes."""

    def __init__(self, spawner_sock):
        self.spawner_sock = spawner_sock
        self.busy = {}  # link -> pid
        self.idle = []  # (link, pid), the latest last

    def collect(self):
        """Move to ``idle`` the busy ones that said so; forget the dead."""
        for link, pid in list(self.busy.items()):
            try:
                said = link.recv(16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                said = b""
            del self.busy[link]
            if said == b"idle":
                self.idle.append((link, pid))
            else:
                link.close()
        while len(self.idle) > IDLE_SUPERVISORS:  # end of file on its link ends it
            self.idle.pop(0)[0].close()

    def start(self, fds):
        """The pid of a supervisor that now has the attempt ``fds``."""
        self.collect()
        while self.idle:
            link, pid = self.idle.pop()
            try:
                socket.send_fds(link, [b"attempt"], fds)
            except OSError:  # it died idle
                link.close()
                continue
            self.busy[link] = pid
            return pid
        return self.fork(fds)

    def fork(self, fds):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            code = 1
            try:
                for sock in [ours, self.spawner_sock, *self.busy, *(link for link, _ in self.idle)]:
                    sock.close()
                # the spawner's socket was its stdin: keep 0 taken, so that no
                # attempt's descriptor lands there (a task's stdin is /dev/null)
                os.open(os.devnull, os.O_RDONLY)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.setsid()
                code = supervise_attempts(theirs, list(fds))
            finally:
                os._exit(code)
        theirs.close()
        self.busy[ours] = pid
        return pid


def serve(sock_fd=0):
    """A worker's spawner: starts a supervisor for each request on the socket
    ``sock_fd`` (SOCK_SEQPACKET), which carries the attempt's control and
    status pipes and output files as descriptors; answers with its pid. It
    hands the attempt to an idle supervisor (see ``Supervisors``), or forks
    one: ~1 ms where a new interpreter costs ~20 ms of CPU. Ends when the
    worker closes the socket (its supervisors finish their attempts)."""
    sock = socket.socket(fileno=sock_fd)
    supervisors = Supervisors(sock)
    signal.signal(signal.SIGCHLD, _reap_children)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 64, 4)
        except OSError:
            return 0
        if not message:
            return 0
        pid = supervisors.start(fds) if len(fds) == 4 else 0
        close_fds(fds)
        sock.send(pid.to_bytes(8, "big"))
