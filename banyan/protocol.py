"""The protocol's words: states, outcomes, resources and limits.

Server, worker and CLI all speak of tasks and workers with these names; this
module is the one place that spells them, and it imports nothing, so the CLI
can use it without loading the server. States and outcomes are `str` enums
(like RQ's `JobStatus`): a member equals, hashes and serializes (JSON, BSON)
as its value, so stored documents and API answers are the same strings as
before. Write `.value` where a plain `str` must reach a store.
"""

import enum


class _Word(str, enum.Enum):
    """A `str` enum that prints as its value ("running", not "TaskState.RUNNING")."""

    def __str__(self):
        return self.value


class TaskState(_Word):
    INACTIVE = "inactive"
    AVAILABLE = "available"
    RUNNING = "running"
    PENDING_CANCELLATION = "pending_cancellation"
    CANCELLED = "cancelled"
    TERMINATED = "terminated"


#: Every task state, in the order of a task's life (listings, summaries).
#: The groups below are tuples of members (`.value` gives a stored string).
TASK_STATES = tuple(TaskState)
#: Ended: nothing will change the task's state again.
FINISHED = (TaskState.CANCELLED, TaskState.TERMINATED)
#: Waiting to be claimed: the states in which queued-only fields
#: (priority, resources, time limit, retries, `held`) may change.
QUEUED = (TaskState.INACTIVE, TaskState.AVAILABLE)
#: An attempt is under way on a worker.
HELD = (TaskState.RUNNING, TaskState.PENDING_CANCELLATION)


class Outcome(_Word):
    """How an attempt ended: its history entry's (and the task's) `exit_status`."""

    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    #: Killed by the kernel for using more than its memory (a worker with --enforce-memory).
    OOM = "oom"
    CANCELLED = "cancelled"
    #: Set by the server when the attempt's worker stopped answering.
    ABANDONED = "abandoned (worker unreachable)"


#: Every stored `exit_status`.
EXIT_STATUSES = tuple(
    o.value
    for o in (Outcome.SUCCESS, Outcome.FAILURE, Outcome.TIMEOUT, Outcome.CANCELLED, Outcome.ABANDONED, Outcome.OOM)
)
#: Outcomes a worker may report for an attempt.
WORKER_OUTCOMES = tuple(
    o.value for o in (Outcome.SUCCESS, Outcome.FAILURE, Outcome.TIMEOUT, Outcome.CANCELLED, Outcome.OOM)
)


class WorkerState(_Word):
    """A registered worker: `active` until it unregisters (`stopped`) or
    stays silent past the heartbeat timeout (`lost`)."""

    ACTIVE = "active"
    LOST = "lost"
    STOPPED = "stopped"


WORKER_STATES = tuple(WorkerState)


class DependencyKind(_Word):
    """What a parent's end must be for a child to run, named after the
    child's field that lists the parent (`after`, `after_any`, `after_failure`)."""

    SUCCESS = "success"
    ANY = "any"
    FAILURE = "failure"


#: The child's field naming its parents -> the kind of those edges.
AFTER_FIELDS = {
    "after": DependencyKind.SUCCESS.value,
    "after_any": DependencyKind.ANY.value,
    "after_failure": DependencyKind.FAILURE.value,
}


def edge_satisfied(kind, parent):
    """Whether a finished `parent` (a task document) lets a child of edge
    `kind` run: the one rule the server's cascade and the client's check of
    a submission's parents share."""
    succeeded = parent.get("state") == TaskState.TERMINATED and parent.get("exit_status") == Outcome.SUCCESS
    if kind == DependencyKind.ANY:
        return True
    return succeeded if kind == DependencyKind.SUCCESS else not succeeded


#: Resources a task requests and a worker offers.
RESOURCES = ("cores", "memory", "gpus")

#: Roles a token may be made with: users submit and see their own tasks,
#: workers run them, admins do both for everyone.
ADMIN, USER, WORKER = "admin", "user", "worker"
ROLES = (ADMIN, USER, WORKER)
#: The role of a token the server makes for one attempt of a task (never by
#: hand): it reads its job's tasks and adds tasks to that job, nothing else.
ATTEMPT_ROLE = "attempt"

#: Attempts a task may lose to lost workers (`lost_count`) before it fails,
#: unless it sets `max_lost`: a lost machine is not the task's failure, so
#: it does not spend `max_retries`.
DEFAULT_MAX_LOST = 3

#: MongoDB stores 64-bit signed integers: the range of any stored count,
#: size or number of bytes.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
