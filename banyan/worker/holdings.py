"""What a worker holds: its claimed, running and dying tasks and the resources
they reserve.

This is the one piece of state the worker's roles share (see ``worker.py``),
all of it under one lock: the claimer adds claimed tasks, the supervisor
starts, ends and kills them, the heartbeat reports them, the reporter gives
their resources back once the server has their results.
"""

import collections
import logging
import os
import shutil
import threading
import time

from ..units import parse_size
from . import resources

log = logging.getLogger(__name__)

__all__ = ["Holdings", "requested", "attempt_of"]

#: ``--prefetch auto`` prefetches while each of the last AUTO_PREFETCH_RUNS
#: attempts ran under AUTO_PREFETCH_BELOW seconds: tasks a round trip to
#: the server (a few ms) is a noticeable part of. At most AUTO_PREFETCH_MAX.
AUTO_PREFETCH_RUNS = 4
AUTO_PREFETCH_BELOW = 0.25
AUTO_PREFETCH_MAX = 8


def requested(task):
    """A task's ``requested_resources`` with the contract's defaults, as numbers."""
    req = task.get("requested_resources") or {}
    cores = req.get("cores")
    memory = req.get("memory")
    gpus = req.get("gpus")
    return {
        "cores": 1.0 if cores is None else float(cores),
        "memory": 0 if memory is None else parse_size(memory),
        "gpus": 0 if gpus is None else int(gpus),
    }


def attempt_of(task):
    """The attempt number the claim created (last history entry)."""
    for entry in (task.get("history") or [])[-1:] + [task.get("current_history")]:
        if isinstance(entry, dict) and entry.get("attempt") is not None:
            return int(entry["attempt"])
    if task.get("attempt") is not None:
        return int(task["attempt"])
    return len(task.get("history") or []) or 1


class Holdings:
    """The tasks a worker holds and what they reserve of its totals.

    Every field is read and written under ``lock`` (reentrant: a role may
    call these methods while holding it). A task's reservation lasts from
    its claim until the server has its report (or the worker gives it up),
    so a claim never offers what a task that ended still holds on the server.
    """

    def __init__(self, total, pin=False):
        self.total = total
        self.lock = threading.RLock()
        self.running = {}  # task id -> TaskProcess, running and reported in heartbeats
        self.doomed = {}  # task id -> TaskProcess, being killed, never reported
        self.waiting: list = []  # [(task, monotonic arrival)]: claimed, waiting for room to start
        self.handing_back: list = []  # prefetched tasks that waited too long: never started here, to go back
        self.inbox = []  # claimed task documents that fit, being started
        self.control: collections.deque = collections.deque()  # ("cancel"|"unknown", task id, attempt or None)
        self.reserved: dict[str, dict] = {}  # task id -> requested resources (inbox, running, doomed)
        self.unreported = {}  # task id -> report not yet delivered, still held in heartbeats
        self.recent_runs: collections.deque = collections.deque(maxlen=AUTO_PREFETCH_RUNS)  # seconds, last attempts
        self.gpus = {}  # task id -> GPU indices handed to it
        self.cpus = resources.CpuAllocator(resources.usable_cpus()) if pin else None
        # Set when a reservation is given back: the claimer waits on it while
        # every core is taken.
        self.released = threading.Event()

    def free(self):
        """What running, claimed and waiting tasks leave of the totals: what a claim offers."""
        with self.lock:
            return self._left(list(self.reserved.values()) + [requested(task) for task, _ in self.waiting])

    def startable(self):
        """What is free to start a task in now: an ended attempt keeps its
        reservation until the server has its report (for what claims offer),
        but its processes are gone."""
        with self.lock:
            return self._left([req for task_id, req in self.reserved.items() if task_id not in self.unreported])

    def _left(self, requests):
        used = {"cores": 0.0, "memory": 0, "gpus": 0}
        for req in requests:
            for key in used:
                used[key] += req[key]
        return {
            "cores": max(0.0, round(self.total["cores"] - used["cores"], 6)),
            "memory": max(0, self.total["memory"] - used["memory"]),
            "gpus": max(0, self.total["gpus"] - used["gpus"]),
        }

    def free_after(self, batch):
        """What is free once the attempts in ``batch`` (reports) are delivered:
        their reservations, if still theirs, come back."""
        with self.lock:
            free = self.free()
            for item in batch:
                held = self.reserved.get(item["task_id"])
                if held is not None and held is item.get("reservation"):
                    for key in free:
                        free[key] += held[key]
        free["cores"] = min(self.total["cores"], round(free["cores"], 6))
        free["memory"] = min(self.total["memory"], free["memory"])
        free["gpus"] = min(self.total["gpus"], free["gpus"])
        return free

    def busy(self):
        """True while any task holds a reservation or waits for room."""
        with self.lock:
            return bool(self.reserved) or bool(self.waiting)

    def held(self):
        """How many tasks are claimed, running or dying here."""
        with self.lock:
            return len(self.running) + len(self.inbox) + len(self.doomed) + len(self.waiting)

    def prefetch_room(self, prefetch):
        """How many tasks a claim may prefetch: ``prefetch`` (a number, or
        "auto": see ``auto_prefetch``) less those waiting."""
        with self.lock:
            if prefetch == "auto":
                prefetch = self.auto_prefetch()
            return max(0, prefetch - len(self.waiting))

    def ran(self, seconds):
        """An attempt ran for ``seconds`` (from its start to its end here)."""
        with self.lock:
            self.recent_runs.append(seconds)

    def auto_prefetch(self):
        """``--prefetch auto``: as many tasks as the worker has cores while
        each of its last ``AUTO_PREFETCH_RUNS`` attempts ran shorter than
        ``AUTO_PREFETCH_BELOW``, else none. Between such tasks the round trip
        to the server for the next one is a large part of each; a task that
        waits for a slot here shows as running for no longer than a short
        task runs (and goes back after ``--prefetch-hold`` if a long one
        came)."""
        with self.lock:
            runs = self.recent_runs
            if len(runs) < AUTO_PREFETCH_RUNS or max(runs) >= AUTO_PREFETCH_BELOW:
                return 0
            return max(1, min(AUTO_PREFETCH_MAX, int(self.total["cores"])))

    def claimed(self, task):
        """A task a claim brought: it waits until it fits what is free (see ``promote``)."""
        self.waiting.append((task, time.monotonic()))

    def promote(self):
        """Move the waiting tasks that fit what is free to start into the
        inbox, reserving what they ask for, in the order they came (one too
        big for what is left is passed over for a smaller one); True if any."""
        with self.lock:
            room, moved = self.startable(), False
            for entry in list(self.waiting):
                req = requested(entry[0])
                if all(req[key] <= room[key] + 1e-9 for key in room):
                    self.waiting.remove(entry)
                    self.reserve(entry[0])
                    for key in room:
                        room[key] -= req[key]
                    moved = True
            return moved

    def give_up_waiting(self, arrived_before=None):
        """Waiting tasks that arrived before ``arrived_before`` (monotonic; all
        when None) leave the waiting list for ``handing_back``: this worker
        will never start them. Returns how many."""
        with self.lock:
            stale = [entry for entry in self.waiting if arrived_before is None or entry[1] < arrived_before]
            for entry in stale:
                self.waiting.remove(entry)
                self.handing_back.append(entry[0])
            return len(stale)

    def reserve(self, task):
        """Take what a claimed task asks for, and queue it to be started."""
        self.reserved[str(task["_id"])] = requested(task)
        self.inbox.append(task)

    def release(self, task_id, reservation=None):
        """Give back a task's resources (only ``reservation``, when given: the
        task may have been claimed again since). Call with ``lock`` held."""
        if reservation is not None and self.reserved.get(task_id) is not reservation:
            return
        if self.reserved.pop(task_id, None) is not None:
            self.released.set()
        self.gpus.pop(task_id, None)
        if self.cpus is not None:
            self.cpus.give_back(task_id)

    def assign_gpus(self, task_id, count):
        """GPU indices for a task, the lowest free ones. Call with ``lock`` held."""
        taken = {i for ids in self.gpus.values() for i in ids}
        free = [i for i in range(self.total["gpus"]) if i not in taken]
        if count > len(free):
            log.warning("task %s asks for %d GPU(s) but only %d are free", task_id, count, len(free))
        self.gpus[task_id] = free[:count]
        return self.gpus[task_id]

    def remove_attempt_dir(self, proc, reservation=None):
        """Remove an ended attempt's directory, and its task's when empty.
        `reservation`: what the ended attempt still holds, if anything."""
        shutil.rmtree(proc.attempt_dir, ignore_errors=True)
        # Once its report is in, the task may be claimed here again, and the
        # next attempt's directory is made inside the task's: keep the task's
        # directory then. Claims reserve under this same lock.
        with self.lock:
            if self.reserved.get(proc.task_id, reservation) is not reservation:
                return
            try:
                os.rmdir(os.path.dirname(proc.attempt_dir))
            except OSError:
                pass
