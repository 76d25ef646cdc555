"""Task states, the transitions between them, and the task graph's rules.

This is the one place that knows what a state change means: who may make it,
what else it touches (history, retries, continuations), and how it is written.
Every write here is a single-document update whose filter carries the state
the change starts from, so it is safe with several server processes sharing
one MongoDB: a lost race matches nothing and is reported or retried, never
applied twice. Hooks, endpoints and the reaper all call into `TaskQueue`.

Continuations are tracked with `pending_parents` (the unfinished parents'
ids) next to `pending_dependency_count`; releasing a child pulls one parent
under the precondition that it is still listed, so a release repeated after
a crash changes nothing. A task whose terminal write succeeded but whose
cascade did not finish keeps `cascade_pending: true` until `resume_cascades`
completes it.
"""

import logging
import math
import time
from datetime import datetime, timedelta, timezone

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from banyan.fit import fits
from banyan.protocol import (
    ADMIN,
    AFTER_FIELDS,
    ATTEMPT_ROLE,
    DEFAULT_MAX_LOST,
    FINISHED,
    HELD,
    INT64_MAX,
    QUEUED,
    RESOURCES,
    USER,
    WORKER,
    WORKER_OUTCOMES,
    DependencyKind,
    Outcome,
    TaskState,
    WorkerState,
    edge_satisfied,
)
from banyan.server.document_locks import locked_documents, takes_document_locks
from banyan.server.identity import acts_for
from banyan.server.ready_candidates import ReadyCandidates, shares_claim_reads
from banyan.server.store import FIND_IN_ONE_BY_ONE, aware, find_in

log = logging.getLogger(__name__)


S = TaskState

SUCCESS = Outcome.SUCCESS.value
FAILURE = Outcome.FAILURE.value
TIMEOUT = Outcome.TIMEOUT.value
OOM = Outcome.OOM.value
CANCELLED = Outcome.CANCELLED.value
ABANDONED = Outcome.ABANDONED.value
#: How many times an `oom` attempt is retried with `retry_memory_factor` times
#: more memory (these retries do not use `max_retries`).
MAX_MEMORY_RETRIES = 3
#: The largest memory request a retry may grow to.
MAX_MEMORY = INT64_MAX
#: A job's caps on the tasks its running tasks add, unless it sets its own
#: (`max_tasks`, `max_depth`): enough for real sweeps and splits, and a
#: runaway loop of tasks adding tasks stops soon.
DEFAULT_MAX_ADDED = 1000
DEFAULT_MAX_DEPTH = 10


#: requested state -> allowed current states, per role. A user asking to
#: cancel a running task gets `pending_cancellation` (see `stored_state`).
USER_TRANSITIONS = {
    S.AVAILABLE: {S.INACTIVE},
    S.CANCELLED: {S.INACTIVE, S.AVAILABLE, S.RUNNING},
}
WORKER_TRANSITIONS = {
    S.RUNNING: {S.AVAILABLE},
}
TRANSITIONS = {
    USER: USER_TRANSITIONS,
    WORKER: WORKER_TRANSITIONS,
    ADMIN: {
        S.AVAILABLE: USER_TRANSITIONS[S.AVAILABLE],
        S.CANCELLED: USER_TRANSITIONS[S.CANCELLED],
        S.RUNNING: WORKER_TRANSITIONS[S.RUNNING],
    },
}
#: Fields a worker may send in `PATCH /tasks/<id>`: the seed's claim only.
WORKER_PATCH_FIELDS = frozenset({"state", "worker"})
#: The registered workers' collection (`workers.WorkerRegistry` keeps it; a claim checks it).
WORKERS = "workers"
#: States a task may be created in.
INITIAL_STATES = (S.INACTIVE, S.AVAILABLE)
#: The state a continuation must be in when it is added to or removed from
#: a task (also at creation: the validator's `data_relation` with
#: `continuation` checks it).
CONTINUATION_STATE = S.INACTIVE

#: Kinds of dependency, by the child's field that names its parents: what
#: the parent's end must be for the child to run. A parent's `continuations`
#: are `after` edges unless the child lists the parent in another field.
SUCCESS_KIND, ANY_KIND, FAILURE_KIND = (k.value for k in DependencyKind)


def edge_kind(child, parent_id):
    """The kind of the edge parent -> `child` (a document with its `after_*` fields)."""
    for field in ("after_any", "after_failure"):
        if parent_id in (child.get(field) or ()):
            return AFTER_FIELDS[field]
    return SUCCESS_KIND


class TransitionError(Exception):
    """The requested change breaks a rule of the task graph or of states.

    The state machine's refusals say what is wrong, never how to answer it:
    `banyan.server.refusals` is the one place that maps them to HTTP."""


class Conflict(TransitionError):
    """The task is not in the state the change starts from: it changed
    under the caller (a lost race) or must change first."""


class Forbidden(TransitionError):
    """The caller's role or token may not make this change."""


class NotFound(TransitionError):
    """A task or worker the change names does not exist (for this caller)."""


def utcnow():
    """Stored times: timezone-aware UTC, to the millisecond as MongoDB keeps them."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def stamp(now=None):
    """Eve's bookkeeping fields for a write the state machine makes itself:
    `_updated`, and a new `_etag` so that a client's `If-Match` on what it
    read before fails. Every such write sets them through here."""
    return {"_updated": now or utcnow(), "_etag": str(ObjectId())}


def check_transition(current, requested, role):
    """Raise TransitionError unless `role` may move a task from `current` to `requested`."""
    current, requested = S(current), S(requested)
    allowed_from = TRANSITIONS.get(role, {}).get(requested)
    if allowed_from is None or current not in allowed_from:
        if role == WORKER and requested in FINISHED:
            raise TransitionError(
                "workers report the end of an attempt with POST /tasks/<id>/finish, not a PATCH of 'state'"
            )
        raise TransitionError(
            "cannot change state from '%s' to '%s'%s" % (current, requested, "" if role == ADMIN else " as a %s" % role)
        )


def check_creation_state(state):
    """Raise TransitionError unless a task may be created in `state`."""
    if state not in INITIAL_STATES:
        raise TransitionError("a task is created 'inactive' or 'available', not '%s'" % state)


def check_field_change(rule, field, state):
    """Raise TransitionError unless a user field under `rule` (its schema's
    `write_once` or `queued_only`) may change on a task in `state`:
    write-once fields until the task leaves `inactive`, queued-only ones
    (priority, resources, limits, retries, `held`) while it waits to be claimed."""
    if rule == "write_once" and state != S.INACTIVE:
        raise TransitionError("'%s' cannot change once a task has left 'inactive' (this one is '%s')" % (field, state))
    if rule == "queued_only" and state not in QUEUED:
        raise TransitionError(
            "'%s' can change only while a task is queued ('inactive' or 'available'); this one is '%s'" % (field, state)
        )


def stored_state(current, requested):
    """The state actually written for an allowed request: a running task being
    cancelled waits for its worker in `pending_cancellation`."""
    if S(requested) == S.CANCELLED and S(current) == S.RUNNING:
        return S.PENDING_CANCELLATION
    return S(requested)


def new_attempt(number, worker_id, host=None):
    """A history entry: one attempt to run a task (like RQ's Execution)."""
    return {
        "attempt": number,
        "worker": worker_id,
        "host": host,
        "started": utcnow(),
        "ended": None,
        "exit_status": None,
        "exit_code": None,
        "usage": None,
        "progress": None,
        # the last heartbeat of its worker that reported this attempt running
        "seen": None,
    }


def seconds_between(start, end):
    """`end - start` in seconds (stored figures such as an attempt's
    `runtime`, kept so statistics need no date arithmetic in the database);
    None when either is unknown."""
    if start is None or end is None:
        return None
    return (aware(end) - aware(start)).total_seconds()


def claim_changes(doc, attempt):
    """Fields a claim of `doc` sets besides its new attempt: `queue_wait`,
    seconds from creation to the first start."""
    if attempt["attempt"] != 1:
        return {}
    return {"queue_wait": seconds_between(doc.get("_created"), attempt["started"])}


def is_ready(doc):
    return doc.get("state") == S.AVAILABLE and not doc.get("pending_dependency_count") and not doc.get("held")


def _within(free, cap):
    """`free`, each resource no more than `cap`'s (None: no cap)."""
    if cap is None:
        return free
    return {key: min(free.get(key, 0), cap.get(key, 0)) for key in RESOURCES}


def _round_size(free, want):
    """How many of `want` tasks one read of candidates looks for: as many
    as `free`'s cores hold at a core each (at least one), or all of them
    when no core is left (then only tasks of no core fit). A worker asks
    for a batch whatever is free, and each candidate read costs the store
    a decode and a match: a busy worker's claim read 40 to take the one
    that fit its freed core. Smaller tasks are claimed over several reads
    (`claim_batch` reads again while there is room)."""
    cores = free.get("cores", 0)
    if cores <= 0:
        return want
    return max(1, math.ceil(min(want, cores)))


READY_FILTER = {"state": S.AVAILABLE.value, "pending_dependency_count": 0, "held": False}
CLAIM_ORDER = [("priority", -1), ("_created", 1), ("_id", 1)]
#: What a claim reads of its candidates.
CLAIM_FIELDS = {
    "history.attempt": 1,
    "_created": 1,
    "priority": 1,
    "job": 1,
    "array_limit": 1,
    "requested_resources": 1,
}
#: Candidates read beyond those a claim asks for (some may be taken by
#: other claimers, or not fit what the first ones leave). Without document
#: locks, as many as it asks for, up to this: each costs the embedded store
#: a decode, a match and a copy (nine for a claim of one took ~0.5 ms), and
#: a claim that lost them all reads again.
CLAIM_SPARES = 8
#: On a store with document locks, a claim reads this many windows of
#: candidates, so that claimers that meet each other's locks pass to the
#: next window instead of reading again (see `TaskQueue._claim_some`).
CLAIM_SPREAD = 4
#: Seconds a batch claim goes on claiming once it has one task (`claim_batch`).
CLAIM_BATCH_SECONDS = 5.0
#: New tasks whose continuations are linked under one batch of document
#: locks (`TaskQueue.prepare_new`), so that a lock is never held long.
LINK_WINDOW = 16


class TaskQueue:
    """The task graph's rules applied to a `tasks` collection.

    `on_ready` is called with each task that becomes claimable, so that
    waiting claims can wake at once; `on_finished` with the id of each task
    that reaches a finished state (`cancelled`, `terminated`), so that
    waits on it (`banyan.server.waits`) can answer at once.
    `share_claim_reads`: whether the claims made through this queue share
    one sorted read of the ready tasks (`ready_candidates`); None: where
    the store sorts in its own process (FerretDB 1.x).
    """

    #: How long an addition of continuations waits for another one to end,
    #: and how long a dead holder keeps others waiting.
    GRAPH_LEASE_WAIT = 5.0
    GRAPH_LEASE_SECONDS = 30

    def __init__(self, db, on_ready=None, on_finished=None, share_claim_reads=None):
        self.db = db
        self.tasks = db["tasks"]
        self.jobs = db["jobs"]
        self.slots = db["slots"]
        self.leases = db["leases"]
        self.on_ready = on_ready or (lambda doc: None)
        self.on_finished = on_finished or (lambda task_id: None)
        #: ReadyCandidates, False when the store needs none, None: ask the store
        self._shared = None if share_claim_reads is None else share_claim_reads and self._shared_read()

    # -- creation ---------------------------------------------------------

    def prepare_new(self, docs, owner=None, adder=None, visible=None):
        """Fill the server fields of tasks about to be inserted and register
        them as parents of their continuations. The tasks wait for the
        parents their `after`, `after_any` and `after_failure` name (linked
        once they are stored, by `after_insert`). Tasks that name no job
        get one made for this request. Tasks a running task adds (`added_by`)
        join its job and its detour (`prepare_children`); `adder` is the
        (task id, job id) of an attempt token, whose additions must be
        children of that task in that job; `visible` the filter of the
        tasks the caller may add children to. Raises TransitionError (and
        undoes its links) when a continuation is no longer `inactive`."""
        linked: list = []
        grown = None
        try:
            grown = self.prepare_children(docs, adder, visible)
            jobs = {
                d["_id"]: d
                for d in self.jobs.find(
                    {"_id": {"$in": list({doc["job"] for doc in docs if doc.get("job")})}}, {"array_limit": 1}
                )
            }
            new_job = None
            for doc in docs:
                doc.setdefault("_id", ObjectId())
            for start in range(0, len(docs), LINK_WINDOW):
                some = docs[start : start + LINK_WINDOW]
                children = [c for doc in some for c in doc.get("continuations") or []]
                # (one lock for each child on a store that needs them: `document_locks`)
                with locked_documents(self.tasks, children):
                    links: dict = {}
                    for doc in some:
                        new_job = self._prepare_one(doc, docs, owner, jobs, grown, links, new_job)
                    self._link_all(links, linked)
            if grown:
                self._check_adders_run(grown["adders"])
        except TransitionError:
            for parent, child in linked:
                self._unlink(parent, child)
            if grown:
                self._undo_growth(grown)
            raise

    def _prepare_one(self, doc, docs, owner, jobs, grown, links, new_job):
        """`prepare_new` for one of `docs`; returns the job made for the
        request (if any yet). Its continuations join `links` ({child:
        [parents]}), linked by `_link_all`."""
        state = S(doc.get("state") or S.INACTIVE)
        check_creation_state(state)
        parents = self._parents_given(doc)
        if not doc.get("job"):
            new_job = new_job or self._new_job(docs[0].get("name"), owner)
            doc["job"] = new_job
        doc.update(
            state=state.value,
            pending_dependency_count=len(parents),
            pending_parents=parents,
            retry_count=0,
            memory_retry_count=0,
            lost_count=0,
            exit_status=None,
            worker=None,
            owner=owner,
            history=[],
            held=bool(doc.get("held")),
            cancelled_by=None,
            array_limit=(jobs.get(doc["job"]) or {}).get("array_limit"),
        )
        detour = grown["detour"].get(doc["_id"], ()) if grown else ()
        for child in dict.fromkeys(doc.get("continuations") or []):
            if child not in detour:  # (linked by `prepare_children`)
                links.setdefault(child, []).append(doc["_id"])
        if parents and doc.get("continuations"):
            for parent in parents:
                if self.find_cycle(parent, list(doc["continuations"])):
                    raise TransitionError(
                        "task '%s' runs after '%s', which already runs after one of "
                        "its continuations: that is a cycle" % (doc["_id"], parent)
                    )
        return new_job

    # -- tasks that running tasks add (a graph that grows) ----------------

    def prepare_children(self, docs, adder=None, visible=None):
        """Fill the fields of new tasks that a running task adds (`added_by`):
        its job, their `depth` (its own + 1) and the attempt that adds them
        (`added_in_attempt`). A child that does not run after the adding
        task (not `--after-self`) becomes a parent of the adding task's
        continuations as well (a detour: they wait for it too): each of them
        gets the child in `pending_parents` (and one more in its count) by
        one conditional update that matches only while it still waits for
        the adding task, so it cannot have been released meanwhile; they
        join the child's `continuations`, so its end settles them. Checks
        the job's caps: `max_depth`, and `max_tasks` taken by one
        conditional `$inc` of the job's `added_tasks`. Returns what
        `_undo_growth` undoes, or None when no task is a child."""
        for doc in docs:
            doc.setdefault("_id", ObjectId())
        if adder is not None:
            self._confine_to_attempt(docs, *adder)
        children = [doc for doc in docs if doc.get("added_by")]
        for doc in docs:
            if not doc.get("added_by"):
                doc.update(added_by=None, added_in_attempt=None, depth=0, superseded=False)
        if not children:
            return None
        adder_ids = list({doc["added_by"] for doc in children})
        adders = {
            d["_id"]: d
            for d in self.tasks.find(
                dict(visible or {}, _id={"$in": adder_ids}),
                {"state": 1, "job": 1, "history.attempt": 1, "depth": 1, "continuations": 1},
            )
        }
        for adder_id in adder_ids:
            doc = adders.get(adder_id)
            if doc is None:
                raise NotFound("'added_by': no task '%s'" % adder_id)
            if doc["state"] != S.RUNNING:
                raise Conflict(
                    "'added_by': task '%s' is '%s'; only a running task adds children "
                    "(--child is for commands run by a task)" % (adder_id, doc["state"])
                )
            doc["attempt"] = len(doc.get("history") or [])
        grown: dict = {
            "adders": {a: adders[a]["attempt"] for a in adder_ids},
            "jobs": {},
            "after_any": [],
            "linked": [],
            "detour": {},
        }
        jobs = {
            d["_id"]: d
            for d in self.jobs.find(
                {"_id": {"$in": list({a["job"] for a in adders.values()})}},
                {"max_tasks": 1, "max_depth": 1, "added_tasks": 1},
            )
        }
        for doc in children:
            parent = adders[doc["added_by"]]
            if doc.get("job") not in (None, parent["job"]):
                raise TransitionError(
                    "a child joins the job of the task that adds it ('%s'), not job '%s'" % (parent["job"], doc["job"])
                )
            job = jobs.get(parent["job"]) or {}
            depth = (parent.get("depth") or 0) + 1
            max_depth = job.get("max_depth")
            max_depth = DEFAULT_MAX_DEPTH if max_depth is None else max_depth
            if depth > max_depth:
                raise TransitionError(
                    "job '%s' allows tasks added by tasks down to depth %d (--max-depth), and task '%s' is "
                    "at depth %d: it may not add children" % (parent["job"], max_depth, parent["_id"], depth - 1)
                )
            doc.update(job=parent["job"], depth=depth, added_in_attempt=parent["attempt"], superseded=False)
            grown["jobs"][parent["job"]] = grown["jobs"].get(parent["job"], 0) + 1
        try:
            for job_id, count in grown["jobs"].items():
                self._count_added(jobs.get(job_id) or {"_id": job_id}, count)
                grown.setdefault("counted", []).append((job_id, count))
            waiting = self._detours(adders)
            for doc in children:
                parent_id = doc["added_by"]
                if parent_id in self._parents_given(doc):
                    continue  # --after-self: it runs after the adding task, nothing waits for it
                detour = grown["detour"][doc["_id"]] = set()
                for child, kind in waiting[parent_id]:
                    if not self.tasks.update_one(
                        {"_id": child, "pending_parents": parent_id},
                        {"$push": {"pending_parents": doc["_id"]}, "$inc": {"pending_dependency_count": 1}},
                    ).modified_count:
                        continue  # it no longer waits for the adding task (cancelled, unlinked)
                    grown["linked"].append((doc["_id"], child))
                    detour.add(child)
                    if kind == ANY_KIND:
                        # the detour edge has the kind of the edge it extends
                        self.tasks.update_one({"_id": child}, {"$addToSet": {"after_any": doc["_id"]}})
                        grown["after_any"].append((child, doc["_id"]))
                doc["continuations"] = list(doc.get("continuations") or []) + [
                    c for c in detour if c not in (doc.get("continuations") or [])
                ]
        except TransitionError:
            self._undo_growth(grown)
            raise
        return grown

    def _confine_to_attempt(self, docs, task_id, job_id):
        """An attempt token adds children of its own task, to its own job,
        related to tasks of that job only."""
        new = {doc.get("_id") for doc in docs}
        named: set = set()
        for doc in docs:
            if doc.get("added_by") not in (None, task_id):
                raise Forbidden(
                    "an attempt token adds children of its own task '%s', not of '%s'" % (task_id, doc["added_by"])
                )
            if doc.get("job") not in (None, job_id):
                raise Forbidden(
                    "an attempt token adds tasks to its own job '%s', not to job '%s'" % (job_id, doc["job"])
                )
            doc["added_by"] = task_id
            for field in list(AFTER_FIELDS) + ["continuations"]:
                named.update(doc.get(field) or [])
        named -= new
        if named and self.tasks.count_documents({"_id": {"$in": list(named)}, "job": job_id}) < len(named):
            raise Forbidden("an attempt token relates new tasks only to tasks of its job '%s'" % job_id)

    def _detours(self, adders):
        """{adder id: [(continuation, kind)]}: the continuations of each
        adding task that its children must also hold back (those waiting
        for it, on its success or on any end; one waiting on its failure
        is about the task alone)."""
        ids = {c for doc in adders.values() for c in doc.get("continuations") or []}
        found = {
            d["_id"]: d
            for d in self.tasks.find(
                {"_id": {"$in": list(ids)}, "pending_parents": {"$in": list(adders)}},
                {"after_any": 1, "after_failure": 1},
            )
        }
        waiting: dict = {}
        for adder_id, doc in adders.items():
            waiting[adder_id] = []
            for child in doc.get("continuations") or []:
                if child in found:
                    kind = edge_kind(found[child], adder_id)
                    if kind != FAILURE_KIND:
                        waiting[adder_id].append((child, kind))
        return waiting

    def _count_added(self, job, count):
        """Take `count` of the job's `max_tasks` additions (one conditional
        `$inc`, so servers adding at once cannot pass the cap together)."""
        cap = job.get("max_tasks")
        cap = DEFAULT_MAX_ADDED if cap is None else cap
        self.jobs.update_one({"_id": job["_id"], "added_tasks": {"$exists": False}}, {"$set": {"added_tasks": 0}})
        if self.jobs.update_one(
            {"_id": job["_id"], "added_tasks": {"$lte": cap - count}}, {"$inc": {"added_tasks": count}}
        ).modified_count:
            return
        now = self.jobs.find_one({"_id": job["_id"]}, {"added_tasks": 1}) or {}
        raise TransitionError(
            "job '%s' allows its tasks to add %d tasks in all (--max-tasks); they added %s, "
            "and this adds %d" % (job["_id"], cap, now.get("added_tasks", 0), count)
        )

    def _undo_growth(self, grown):
        for child, waiting in grown.pop("linked", []):
            self._unlink(child, waiting)
        for job_id, count in grown.pop("counted", []):
            self.jobs.update_one({"_id": job_id}, {"$inc": {"added_tasks": -count}})
        for child, new in grown["after_any"]:
            self.tasks.update_one({"_id": child}, {"$pullAll": {"after_any": [new]}})

    def _check_adders_run(self, adders):
        """The adding tasks still run the attempts that add (checked once the
        detour edges are in place: an attempt that ended before they were
        may have released its continuations without them)."""
        for task_id, attempt in adders.items():
            if (
                self.tasks.find_one(
                    {"_id": task_id, "state": S.RUNNING.value, "history": {"$size": attempt}}, {"_id": 1}
                )
                is None
            ):
                raise Conflict(
                    "task '%s' ended its attempt %d while it added children; they were not added" % (task_id, attempt)
                )

    def drop_children(self, task_id, attempt=None):
        """The tasks attempt `attempt` of `task_id` added (all its attempts'
        when None), once that attempt ended without success: its
        continuations stop waiting for them, they are cancelled (with what
        runs after them alone), and they are marked `superseded`, so a retry
        adds one set of children, not a second beside the first. Safe to
        repeat."""
        query = {"added_by": task_id, "superseded": {"$ne": True}}
        if attempt is not None:
            query["added_in_attempt"] = attempt
        parent = self.tasks.find_one({"_id": task_id}, {"continuations": 1, "name": 1, "exit_status": 1, "state": 1})
        if parent is None:
            return
        theirs = set(parent.get("continuations") or [])
        for child in self.tasks.find(query, {"continuations": 1, "added_in_attempt": 1}):
            detour = [c for c in child.get("continuations") or [] if c in theirs]
            for waiting in detour:
                released = self._unlink(child["_id"], waiting, release=True)
                self.tasks.update_one({"_id": waiting}, {"$pullAll": {"after_any": [child["_id"]]}})
                if released is not None and released.get("pending_dependency_count") == 0:
                    self._release(released)
            if detour:
                self.tasks.update_one({"_id": child["_id"]}, {"$pullAll": {"continuations": detour}})
            if child["_id"] in theirs:  # --after-self: the parent's retry must not bring it back
                self.tasks.update_one({"_id": task_id}, {"$pullAll": {"continuations": [child["_id"]]}})
            because = {
                "task": task_id,
                "name": parent.get("name"),
                "attempt": child.get("added_in_attempt"),
                "exit_status": parent.get("exit_status") or parent.get("state"),
                "needed": SUCCESS_KIND,
            }
            self.cancel(child["_id"], cancelled_by=because)
            self.tasks.update_one({"_id": child["_id"]}, {"$set": {"superseded": True}})

    def drop_if_adder_ended(self, docs):
        """Children stored after the attempt that added them ended (it ended
        between `prepare_new`'s check and the insert): dropped as that
        attempt's end would have dropped them."""
        for doc in docs:
            adder, attempt = doc.get("added_by"), doc.get("added_in_attempt")
            if (
                adder
                and self.tasks.find_one(
                    {"_id": adder, "state": {"$in": [s.value for s in HELD]}, "history": {"$size": attempt}}, {"_id": 1}
                )
                is None
            ):
                ended = self.tasks.find_one({"_id": adder}, {"state": 1, "exit_status": 1, "history.attempt": 1}) or {}
                if not (
                    ended.get("state") == S.TERMINATED
                    and ended.get("exit_status") == SUCCESS
                    and len(ended.get("history") or []) == attempt
                ):
                    self.drop_children(adder, attempt)

    @staticmethod
    def _parents_given(doc):
        """The parents named by a new task's `after`, `after_any` and
        `after_failure` (each once; a parent in two of them is refused)."""
        parents: dict = {}
        for field in AFTER_FIELDS:
            for parent in doc.get(field) or []:
                if parents.get(parent, field) != field:
                    raise TransitionError(
                        "task '%s' is named in both '%s' and '%s'; an edge has one kind"
                        % (parent, parents[parent], field)
                    )
                parents[parent] = field
        return list(parents)

    def _new_job(self, name, owner):
        """A job for tasks submitted without one (one per request)."""
        now = utcnow()
        job = {
            "_id": ObjectId(),
            "name": name,
            "array_limit": None,
            "owner": owner,
            "added_tasks": 0,
            "max_tasks": None,
            "max_depth": None,
            "_created": now,
            **stamp(now),
        }
        self.jobs.insert_one(job)
        return job["_id"]

    def forget_new(self, docs):
        """Tasks `prepare_new` linked but the store did not take: their
        continuations stop waiting for them."""
        for doc in docs:
            if self.tasks.find_one({"_id": doc["_id"]}, {"_id": 1}) is None:
                for child in dict.fromkeys(doc.get("continuations") or []):
                    self._unlink(doc["_id"], child)

    def after_insert(self, docs):
        self.drop_if_adder_ended(docs)
        for doc in docs:
            for parent in doc.get("pending_parents") or []:
                self._attach(parent, doc["_id"])
        for doc in docs:
            if doc.get("pending_parents"):
                doc = self.tasks.find_one({"_id": doc["_id"]})
                if doc is None or doc.get("pending_parents"):
                    continue
                # every parent had finished already: settled by `_attach`
                self._release(doc)
            elif is_ready(doc):
                self._became_ready(doc)

    def _attach(self, parent_id, child_id):
        """A new task waits for `parent_id`: it joins the parent's
        continuations, so the parent's cascade settles the edge. A parent
        that had finished before may have cascaded without it: then the edge
        is settled here (settling twice changes nothing)."""
        self.tasks.update_one({"_id": parent_id}, {"$addToSet": {"continuations": child_id}})
        parent = self.tasks.find_one({"_id": parent_id}, {"state": 1, "exit_status": 1, "name": 1})
        if parent is not None and parent["state"] in FINISHED:
            if self._settle(parent, child_id, release=False):
                self._cascade(child_id)

    # -- continuations ----------------------------------------------------

    def _link_all(self, links, linked):
        """Make each child of `links` ({child: [parents]}) wait for its
        parents, in one update per child (the parents of one POST are new
        tasks, which no child waits for yet); a child that this update
        misses is linked parent by parent (`_link`'s rule). Each edge made
        joins `linked`. A graph of 500 tasks before one cost 500 updates of
        a child with a growing list, O(n^2)."""
        for child, parents in links.items():
            result = self.tasks.update_one(
                {"_id": child, "state": CONTINUATION_STATE.value, "pending_parents": {"$nin": parents}},
                {"$push": {"pending_parents": {"$each": parents}}, "$inc": {"pending_dependency_count": len(parents)}},
            )
            for parent in parents:
                if result.matched_count == 0:
                    self._link(parent, child)
                linked.append((parent, child))

    def _link(self, parent_id, child_id):
        """Make `child_id` wait for `parent_id` (`_require_inactive`'s rule).
        Returns how many parents the child waits for with this one, or None
        when it waited for it already: the update's own precondition says
        whether this call made the edge (a read before it could be stale)."""
        doc = self.tasks.find_one_and_update(
            {"_id": child_id, "state": CONTINUATION_STATE.value, "pending_parents": {"$ne": parent_id}},
            {"$push": {"pending_parents": parent_id}, "$inc": {"pending_dependency_count": 1}},
            return_document=ReturnDocument.AFTER,  # whole: FerretDB 1.24 has no findAndModify projection
        )
        if doc is None:
            self._require_inactive(child_id)
            return None
        return doc["pending_dependency_count"]

    def _unlink(self, parent_id, child_id, release=False):
        """Stop `child_id` waiting for `parent_id` (idempotent); the child as
        stored after it, or None. `release`: when this is its last parent, an
        inactive child becomes available in the same write (`_release` then
        only announces it): released by a second write, it could be held
        back for good by a continuation addition linking it in between
        whose parent's write then fails."""
        unlink = {"$pull": {"pending_parents": parent_id}, "$inc": {"pending_dependency_count": -1}}
        if release:
            doc = self.tasks.find_one_and_update(
                {
                    "_id": child_id,
                    "pending_parents": parent_id,
                    "pending_dependency_count": 1,
                    "state": S.INACTIVE.value,
                },
                dict(unlink, **{"$set": {"state": S.AVAILABLE.value, **stamp()}}),
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return doc
        return self.tasks.find_one_and_update(
            {"_id": child_id, "pending_parents": parent_id}, unlink, return_document=ReturnDocument.AFTER
        )

    def link(self, parent, child_ids):
        """Add continuations to an existing task: children wait for it unless
        it already finished. Returns (doomed, linked): the children to
        cancel once the parent's write is done (those of a failed or
        cancelled parent), and the edges this call made, [(child, how many
        parents it waits for with this one)], for `_undo_link`."""
        state, status = parent.get("state"), parent.get("exit_status")
        doomed, linked = [], []
        for child in child_ids:
            if state in FINISHED:
                self._require_inactive(child)
                if not (state == S.TERMINATED and status == SUCCESS):
                    doomed.append(child)
            else:
                waits = self._link(parent["_id"], child)
                if waits is not None:
                    linked.append((child, waits))
        return doomed, linked

    def unlink(self, parent, child_ids, require_inactive=True):
        """Remove continuations; a child left with no pending parent may run.
        `require_inactive=False` is for a removal already checked and written
        to the parent: the child must then stop waiting whatever its state."""
        for child in child_ids:
            if require_inactive:
                self._require_inactive(child)
            doc = self._unlink(parent["_id"], child, release=True)
            if doc is not None and doc.get("pending_dependency_count") == 0:
                self._release(doc)

    def _require_inactive(self, child_id):
        """The rule for a continuation added or removed: it must exist and be
        `inactive` (`CONTINUATION_STATE`), so it has not started yet."""
        doc = self.tasks.find_one({"_id": child_id}, {"state": 1})
        if doc is None:
            raise TransitionError("continuation '%s' does not exist" % child_id)
        if doc["state"] != CONTINUATION_STATE:
            raise TransitionError("continuation '%s' is '%s', not '%s'" % (child_id, doc["state"], CONTINUATION_STATE))

    def find_cycle(self, parent_id, child_ids, limit=200000):
        """True if `parent_id` is reachable from one of `child_ids`, so that
        adding them would close a cycle. Walks continuations breadth first,
        one read per level (`store.find_in`)."""
        if parent_id in child_ids:
            return True
        seen, frontier = set(child_ids), list(child_ids)
        while frontier and len(seen) < limit:
            nxt = []
            for doc in find_in(self.tasks, "_id", frontier, projection={"continuations": 1}):
                for c in doc.get("continuations") or []:
                    if c == parent_id:
                        return True
                    if c not in seen:
                        seen.add(c)
                        nxt.append(c)
            frontier = nxt
        return False

    # -- continuation changes on an existing task (virtual fields) -------

    #: How long a continuation lease outlives a request that died holding it.
    CONTINUATION_LEASE_SECONDS = 60

    def begin_continuation_change(self, parent, add=(), remove=()):
        """Start adding and removing continuations of the existing task
        `parent` (its document as read before the change); the caller then
        writes the parent (`$addToSet`/`$push`/`$pull`) and calls
        `end_continuation_change`, or `abort_continuation_change` if that
        write failed.

        Takes the parent's continuation lease: a field on the parent, set
        under a precondition on its `_etag` and `state`, so one continuation
        change per task runs at a time across server processes (another
        answers 409) and the parent's list and its children's
        `pending_parents` cannot drift apart. Then checks the rules (removed
        children inactive, no cycle) and links the added children. Returns
        the lease: its token, the edges it made and the children to cancel
        once the write is done (see `link`). Raises Conflict or
        TransitionError with nothing left changed. The lease does not stop
        the parent's own end (a worker's report takes none): the parent's
        write then fails, and `_undo_link` undoes exactly the edges made."""
        add, remove = list(dict.fromkeys(add)), list(dict.fromkeys(remove))
        token, now = str(ObjectId()), utcnow()
        query = {
            "_id": parent["_id"],
            "$or": [{"continuation_lease": None}, {"continuation_lease.expires": {"$lt": now}}],
        }
        for key in ("_etag", "state"):
            if key in parent:
                query[key] = parent[key]
        lease = {"token": token, "expires": now + timedelta(seconds=self.CONTINUATION_LEASE_SECONDS)}
        log.debug("continuation lease: filter %s, update %s", query, {"$set": {"continuation_lease": lease}})
        if not self.tasks.update_one(query, {"$set": {"continuation_lease": lease}}).matched_count:
            raise Conflict(
                "task '%s' changed or is having its continuations changed by another request; "
                "read it again and retry" % parent["_id"]
            )
        linked, doomed, graph = [], [], False
        try:
            if add:
                graph = self._take_graph_lease(token)
            for child in remove:
                self._require_inactive(child)
            if add and self.find_cycle(parent["_id"], add):
                raise TransitionError(
                    "adding %s to the continuations of '%s' would create a cycle"
                    % (", ".join("'%s'" % c for c in add), parent["_id"])
                )
            for child in add:
                ruled_out, made = self.link(parent, [child])
                doomed += ruled_out
                linked += made
        except Exception:  # a refusal, or the store failing: leave nothing held
            self.abort_continuation_change(parent, (token, linked, doomed, graph))
            raise
        return token, linked, doomed, graph

    def end_continuation_change(self, parent, lease, remove=()):
        """The parent's write succeeded: removed children stop waiting for
        it (and run if it was their last parent), children added to a failed
        or cancelled parent are cancelled; the lease is released."""
        token, _, doomed, graph = lease
        try:
            self.unlink(parent, list(dict.fromkeys(remove)), require_inactive=False)
            for child in doomed:
                self.cancel(child)
        finally:
            self._release_lease(parent["_id"], token, graph)

    def abort_continuation_change(self, parent, lease):
        """The parent's write did not happen: undo the links and release."""
        token, linked, _, graph = lease
        try:
            for child, waits in linked:
                self._undo_link(parent["_id"], child, waits)
        finally:
            self._release_lease(parent["_id"], token, graph)

    def _undo_link(self, parent_id, child_id, waits):
        """Undo the edge parent -> child that a continuation change made
        (the child then waited for `waits` parents) before the parent's
        write failed. The write fails when the parent changed meanwhile,
        for one because it ended: if it lists the child already, its
        cascade may have settled this edge before the change made it again,
        so the edge is settled as the cascade settles it. Otherwise the
        child stops waiting for it; if the other parents it waited for were
        all settled or removed meanwhile, their last one did not release it
        (it still waited for this edge), so it is released here."""
        parent = self.tasks.find_one(
            {"_id": parent_id, "continuations": child_id}, {"state": 1, "exit_status": 1, "name": 1}
        )
        if parent is not None and parent["state"] in FINISHED:
            if self._settle(parent, child_id):
                self._cascade(child_id)
            return
        doc = self._unlink(parent_id, child_id)
        if doc is not None and waits > 1 and doc.get("pending_dependency_count") == 0:
            if self._release(doc):
                self._cascade(child_id)

    def _take_graph_lease(self, token):
        """Additions of continuations run one at a time across the queue (and
        server processes): two requests each adding one edge of a cycle
        (A -> B, B -> A) would each walk a graph without the other's edge and
        both pass. One document, taken by a conditional upsert; a holder
        that died loses it when it expires. Waits up to GRAPH_LEASE_WAIT."""
        deadline = time.monotonic() + self.GRAPH_LEASE_WAIT
        while True:
            now = utcnow()
            try:
                self.leases.update_one(
                    {"_id": "continuation_graph", "$or": [{"token": None}, {"expires": {"$lt": now}}]},
                    {"$set": {"token": token, "expires": now + timedelta(seconds=self.GRAPH_LEASE_SECONDS)}},
                    upsert=True,
                )
                return True
            except DuplicateKeyError:  # held by another request
                if time.monotonic() > deadline:
                    raise Conflict("other requests are changing continuations; retry") from None
                time.sleep(0.002)

    def _release_lease(self, parent_id, token, graph=False):
        try:
            self.tasks.update_one(
                {"_id": parent_id, "continuation_lease.token": token}, {"$unset": {"continuation_lease": ""}}
            )
        finally:
            if graph:
                self.leases.update_one({"_id": "continuation_graph", "token": token}, {"$set": {"token": None}})

    # -- user changes through PATCH --------------------------------------

    def authorize_update(self, updates, identity):
        """Who may change a task: only workers (and admins) claim, and a
        worker's PATCH is a claim and nothing else. Checked before the
        validator's rules (so that these answer 403, and apply to internal
        PATCHes too); raises Forbidden, or NotFound for an inactive worker."""
        role = identity.role
        claiming = updates.get("state") == S.RUNNING
        if role == ADMIN:
            if claiming:
                self.require_claiming_worker(updates.get("worker"), identity)
            return
        if role == WORKER:
            extra = set(updates) - WORKER_PATCH_FIELDS
            if extra or not claiming:
                raise Forbidden(
                    "a worker may only claim a task by PATCH ({'state': 'running', 'worker': <id>}); "
                    "it reports attempts with POST /tasks/<id>/finish and cannot change %s"
                    % ", ".join(sorted(extra or {"state"}))
                )
            self.require_claiming_worker(updates.get("worker"), identity)
            return
        if claiming or "worker" in updates:
            raise Forbidden("only workers claim tasks (state 'running', 'worker')")
        if role == ATTEMPT_ROLE:
            raise Forbidden("an attempt token may add tasks to its job, not change tasks")
        if role != USER:
            raise Forbidden("no role may change tasks without a token")

    def require_claiming_worker(self, worker_id, identity):
        """The worker a claim names is registered and active, and a worker
        token claims only under a worker id it registered."""
        if worker_id is None:
            return  # the claim names no worker: the validator says what is missing
        try:
            worker_id = ObjectId(worker_id)
        except (InvalidId, TypeError):
            return  # the validator reports the type
        worker = self.db[WORKERS].find_one({"_id": worker_id}, {"token_id": 1, "state": 1})
        if worker is None:
            raise TransitionError("no worker '%s' is registered; register with POST /workers" % worker_id)
        if not acts_for(identity, worker):
            raise Forbidden("worker '%s' was registered with another token" % worker_id)
        if worker.get("state") != WorkerState.ACTIVE:
            raise NotFound("worker '%s' is %s; register again" % (worker_id, worker.get("state")))

    def prepare_update(self, updates, original, identity):
        """Complete a validated PATCH before it is written: the stored state
        for a cancellation, the worker and a new attempt for a claim."""
        if updates.get("state") == S.RUNNING and original.get("state") != S.AVAILABLE:
            # A claim that lost the race read the task before the winner wrote
            # it; without this the "no-op" state change would rewrite `worker`.
            raise Conflict(
                "task '%s' is '%s' (worker '%s'), not 'available'"
                % (original.get("_id"), original.get("state"), original.get("worker"))
            )
        if updates.get("state") == S.RUNNING and original.get("held"):
            raise Conflict("task '%s' is held and cannot be claimed until it is released" % original.get("_id"))
        if (
            updates.get("state") == S.RUNNING
            and original.get("array_limit")
            and original.get("job")
            and original.get("state") == S.AVAILABLE
            and not original.get("pending_dependency_count")
        ):
            if self._take_slot(original["job"], original["array_limit"], original["_id"]) is None:
                raise Conflict(
                    "task '%s': its job runs at most %d tasks at once, and that many run"
                    % (original["_id"], original["array_limit"])
                )
        if updates.get("state") == S.RUNNING and original.get("pending_dependency_count"):
            # An available task's count only goes down (continuations are
            # added to inactive tasks only), so the value read decides.
            raise Conflict(
                "task '%s' waits for %d unfinished parent(s) and cannot be claimed yet"
                % (original.get("_id"), original["pending_dependency_count"])
            )
        if "worker" in updates and updates.get("state") != S.RUNNING:
            raise TransitionError("'worker' is set only by a claim ({'state': 'running', 'worker': <id>})")
        if "state" not in updates or updates["state"] == original.get("state"):
            return
        target = stored_state(original["state"], updates["state"])
        updates["state"] = target.value
        if target == S.RUNNING:
            worker = identity.worker_id or updates.get("worker")
            if worker is None:
                raise TransitionError("a claim must name the worker ('worker' field)")
            if identity.worker_id and updates.get("worker") not in (None, identity.worker_id):
                raise Forbidden("a worker claims tasks under its own id only")
            updates["worker"] = worker
            history = list(original.get("history") or [])
            history.append(new_attempt(len(history) + 1, worker, identity.host))
            updates["history"] = history
            updates.update(claim_changes(original, history[-1]))
        elif target == S.CANCELLED:
            updates["exit_status"] = CANCELLED
            updates["cascade_pending"] = True
            updates["pending_parents"], updates["pending_dependency_count"] = [], 0

    # -- retry: a finished task back in the queue --------------------------

    def retry(self, doc):
        """Put the finished task `doc` (as just read) back in the queue: its
        next claim is a new attempt, and it waits for those of its parents
        that have not finished. The tasks cancelled because of it come back
        too (`revive_descendants`). Refused for a task that succeeded or has
        not finished, and for one whose parent ended in a way that rules it
        out (retry that one). One write, conditional on the task being as
        read. Returns the task as stored after the change."""
        state, task_id = doc.get("state"), doc["_id"]
        if state not in FINISHED:
            raise Conflict("task '%s' is '%s'; only finished tasks are retried" % (task_id, state))
        if state == S.TERMINATED and doc.get("exit_status") == SUCCESS:
            raise TransitionError("task '%s' is terminated with success; there is nothing to retry" % task_id)
        if doc.get("cascade_pending"):
            raise Conflict("task '%s' is still settling the tasks that run after it; retry in a moment" % task_id)
        pending = self.parents_to_wait_for(doc)
        self.drop_children(task_id)  # (done when its attempts ended, unless a crash cut that short)
        now = utcnow()
        updated = self.tasks.find_one_and_update(
            {"_id": task_id, "state": state, "_etag": doc.get("_etag"), "cascade_pending": {"$ne": True}},
            {
                "$set": {
                    "state": S.AVAILABLE.value,
                    "exit_status": None,
                    "cancelled_by": None,
                    "cancel_reason": None,
                    "worker": None,
                    "retry_count": 0,
                    "pending_parents": pending,
                    "pending_dependency_count": len(pending),
                    **stamp(now),
                }
            },
            return_document=ReturnDocument.AFTER,
        )
        if updated is None:
            raise Conflict("task '%s' changed while it was being retried; read it again" % task_id)
        if self._settle_ended_meanwhile(task_id, pending):
            updated = self.tasks.find_one({"_id": task_id})
        updated["revived"] = self.revive_descendants(task_id)
        if is_ready(updated):
            self._became_ready(updated)
        return updated

    def _settle_ended_meanwhile(self, task_id, pending):
        """`task_id` was just written back to the queue waiting for
        `pending`, its parents that had not ended when it was read. One
        that ended since cascaded while the task was still finished and
        passed it over: settle that edge now (settling twice changes
        nothing). True if any had ended."""
        ended = find_in(
            self.tasks,
            "_id",
            pending,
            {"state": {"$in": [s.value for s in FINISHED]}},
            {"state": 1, "exit_status": 1, "name": 1},
        )
        for parent in ended:
            if self._settle(parent, task_id):
                self._cascade(task_id)
        return bool(ended)

    def parents_to_wait_for(self, doc):
        """The parents of `doc` that have not finished. TransitionError (409)
        naming a finished parent whose end rules `doc` out."""
        pending = []
        for parent in self.tasks.find({"continuations": doc["_id"]}, {"state": 1, "exit_status": 1, "name": 1}):
            if parent["state"] not in FINISHED:
                pending.append(parent["_id"])
                continue
            kind = edge_kind(doc, parent["_id"])
            if not edge_satisfied(kind, parent):
                raise Conflict(
                    "task '%s' runs only after the %s of task '%s'%s, which ended %s; retry that task "
                    "(the tasks cancelled because of it come back with it)"
                    % (
                        doc["_id"],
                        kind if kind != ANY_KIND else "end",
                        parent["_id"],
                        " (%s)" % parent["name"] if parent.get("name") else "",
                        parent.get("exit_status") or parent["state"],
                    )
                )
        return pending

    def revive_descendants(self, task_id):
        """After a retry of `task_id`: the tasks cancelled because of it
        (`cancelled_by`), and theirs in turn, go back to the queue waiting
        for their unfinished parents, so the graph can finish. Returns their ids."""
        queue, revived = [task_id], []
        while queue:
            current = queue.pop(0)
            doc = self.tasks.find_one({"_id": current}, {"continuations": 1})
            for child in find_in(
                self.tasks,
                "_id",
                (doc or {}).get("continuations") or [],
                {"state": S.CANCELLED.value, "cancelled_by.task": current},
            ):
                try:
                    pending = self.parents_to_wait_for(child)
                except TransitionError:
                    continue  # another parent rules it out too
                now = utcnow()
                if self.tasks.update_one(
                    {"_id": child["_id"], "state": S.CANCELLED.value, "cancelled_by.task": current},
                    {
                        "$set": {
                            "state": S.AVAILABLE.value,
                            "exit_status": None,
                            "cancelled_by": None,
                            "retry_count": 0,
                            "pending_parents": pending,
                            "pending_dependency_count": len(pending),
                            **stamp(now),
                        }
                    },
                ).modified_count:
                    self._settle_ended_meanwhile(child["_id"], pending)
                    queue.append(child["_id"])
                    revived.append(child["_id"])
        return revived

    def after_update(self, updates, original):
        """React to a PATCH that was written: cascade a cancellation, run a
        task that became ready (made available, or released from a hold).
        A change of a queued task (its priority, resources, hold) is new to
        the claims' shared read."""
        state = updates.get("state")
        if self._shared and original.get("state") == S.AVAILABLE:
            self._shared.forget()
        if state == S.CANCELLED and original.get("state") != S.CANCELLED:
            self.on_finished(original["_id"])
            self._cascade(original["_id"])
        elif (state == S.AVAILABLE and original.get("state") != S.AVAILABLE) or (
            updates.get("held") is False and original.get("held")
        ):
            doc = self.tasks.find_one({"_id": original["_id"]})
            if doc is not None and is_ready(doc):
                self._became_ready(doc)

    # -- transitions used by workers, the reaper and cascades -------------

    def claim_next(self, worker_id, free, host=None):
        """Claim the best ready task that fits `free` (cores, memory, gpus):
        one atomic update, so of racing claimers exactly one gets each task."""
        free = dict(free)
        full: set[object] = set()  # jobs at their array limit
        busy: set[object] = set()  # tasks another writer holds
        while True:
            claimed = self._claim_some(worker_id, free, 1, host, full, busy)
            if claimed is None:
                return None
            if claimed:
                return claimed[0]
            # every candidate was taken by another claimer meanwhile: the next ones

    @staticmethod
    def _ready_query(free):
        query = dict(READY_FILTER)
        for key in ("cores", "memory", "gpus"):
            query["requested_resources.%s" % key] = {"$lte": free.get(key, 0)}
        if free.get("cores", 0) <= 0:
            # Only tasks of no core fit (cores are >= 0): an equality the
            # `ready_coreless_in_order` index answers, rather than a walk over every
            # ready task (each claim that fills a worker ends with this one).
            query["requested_resources.cores"] = 0
        return query

    def _claim_some(self, worker_id, free, want, host, full, busy, cap=None, deadline=None):
        """Claim up to `want` of the best ready tasks that together fit
        `free` (which is reduced by what they request), each within `cap`
        when given. The candidates come from one sorted read (on a store
        that sorts in its own process, as FerretDB 1.x does, the read shared
        by the claims of this process: `ready_candidates`); each is then
        claimed by one atomic update whose filter is the query again, so of
        racing claimers exactly one gets each task.

        On a store that needs document locks (`document_locks`), the
        candidates' locks are taken a window at a time, and those another
        writer holds (another claim's, mostly) are passed over and added to
        `busy`, which later reads of this batch leave out: concurrent
        claimers spread over the queue instead of queueing behind one
        another on the same tasks.
        `full`: jobs found at their array limit (grows). Past `deadline`
        (time.monotonic()), it stops once it has claimed one. Returns the
        tasks claimed, as stored after the claim; an empty list when every
        candidate was taken by another claimer meanwhile; None when none is
        ready."""
        shared = self._shared_candidates()
        if shared is None:
            candidates = self._read_candidates(free, want, full, busy, cap)
        else:
            bound = _within(free, cap)

            def accept(doc):
                return (
                    fits(doc.get("requested_resources") or {}, bound)
                    and doc.get("job") not in full
                    and doc["_id"] not in busy
                )

            candidates = shared.take(accept, want, bound)
            if candidates is None:
                mark = shared.own_read() if not full and not busy else None
                candidates = self._read_candidates(free, want, full, busy, cap)
                if not candidates and mark is not None:
                    shared.found_nothing(bound, mark)
                shared = None
        if not candidates:
            return None
        claimed: list = []
        gone: set = set()  # candidates claimed, or no longer ready as read

        def enough():
            return len(claimed) >= want or (bool(claimed) and deadline is not None and time.monotonic() > deadline)

        window = want + CLAIM_SPARES
        try:
            for start in range(0, len(candidates), window):
                if enough():
                    break
                some = candidates[start : start + window]
                with locked_documents(self.tasks, [doc["_id"] for doc in some]) as held:
                    for doc in some:
                        if enough():
                            break
                        if doc["_id"] not in held:
                            busy.add(doc["_id"])
                            continue
                        done = self._claim_one(doc, worker_id, free, host, full, cap, gone)
                        if done is not None:
                            claimed.append(done)
        finally:
            # not again in this batch: a candidate that failed its precondition
            busy.update(gone.difference(doc["_id"] for doc in claimed))
            if shared is not None:
                shared.drop(gone)
                shared.give_back([doc for doc in candidates if doc["_id"] not in gone])
        return claimed

    def _read_candidates(self, free, want, full, busy, cap):
        """The best ready tasks that fit `free` (within `cap`), other than
        those of `full` jobs and `busy` tasks, in the claim order: `want`
        of them and as many spares (at most CLAIM_SPARES); on a store with
        document locks, CLAIM_SPREAD windows of `want` and CLAIM_SPARES."""
        query = self._ready_query(_within(free, cap))
        if full:
            query["job"] = {"$nin": list(full)}
        if busy:
            query["_id"] = {"$nin": list(busy)}
        window = want + CLAIM_SPARES
        limit = window * CLAIM_SPREAD if takes_document_locks(self.tasks) else want + min(want, CLAIM_SPARES)
        return list(self.tasks.find(query, CLAIM_FIELDS, sort=CLAIM_ORDER, limit=limit, batch_size=limit))

    def _shared_candidates(self):
        """The sorted read shared by this process's claims, on a store that
        sorts in its own process (`ready_candidates`); else None."""
        if self._shared is None:
            self._shared = shares_claim_reads(self.tasks) and self._shared_read()
        return self._shared or None

    def _shared_read(self):
        return ReadyCandidates(
            lambda limit: list(
                self.tasks.find(READY_FILTER, CLAIM_FIELDS, sort=CLAIM_ORDER, limit=limit, batch_size=limit)
            )
        )

    def _claim_one(self, doc, worker_id, free, host, full, cap=None, gone=None):
        """Claim the candidate `doc` if it still fits `free` (then reduced by
        what it requests) and `cap`; the task as stored after the claim, or
        None. Its id joins `gone` when it is claimed or no longer ready as read."""
        requested = doc.get("requested_resources") or {}
        bound = _within(free, cap)
        if not fits(requested, bound):
            return None  # what the tasks claimed before it left is too little
        if doc.get("job") in full:
            return None
        slot = None
        if doc.get("array_limit") and doc.get("job"):
            slot = self._take_slot(doc["job"], doc["array_limit"], doc["_id"])
            if slot is None:
                full.add(doc["job"])
                return None
        attempt = new_attempt(len(doc.get("history") or []) + 1, worker_id, host)
        now = utcnow()
        # The filter again, as the precondition: a PATCH may have held
        # the task or changed its resources since it was read.
        done = self.tasks.find_one_and_update(
            dict(self._ready_query(bound), _id=doc["_id"], history={"$size": attempt["attempt"] - 1}),
            {
                "$set": {"state": S.RUNNING.value, "worker": worker_id, **stamp(now), **claim_changes(doc, attempt)},
                "$push": {"history": attempt},
            },
            return_document=ReturnDocument.AFTER,
        )
        if gone is not None:
            gone.add(doc["_id"])
        if done is None:
            if slot:
                self._free_slot(doc["_id"], doc["job"], slot)
            return None
        for key in RESOURCES:
            free[key] = free.get(key, 0) - ((done.get("requested_resources") or {}).get(key) or 0)
        return done

    # -- array limits: run slots ------------------------------------------

    def _take_slot(self, job_id, limit, task_id):
        """One of the job's `limit` run slots for `task_id`, or None if all
        are taken. A slot is a document of the `slots` collection whose `_id`
        is "<job id>/<n>" for n below the limit: taking it is an insert, and
        of two inserts of one `_id` the store keeps exactly one (a unique key
        holds even where concurrent conditional updates are not serialized).
        Each slot has a token of its own, so a claim that lost its race gives
        back only its slot, never the winner's. Slots of tasks that finished
        without giving theirs back (a server killed between the two writes)
        are reclaimed. Returns the slot's (`_id`, token)."""
        for _ in range(2):
            taken = {d["_id"]: d.get("task") for d in self.slots.find({"job": job_id}, {"task": 1})}
            if len(taken) < limit:
                for n in range(limit):
                    key = "%s/%d" % (job_id, n)
                    if key in taken:
                        continue
                    token = str(ObjectId())
                    try:
                        self.slots.insert_one({"_id": key, "job": job_id, "task": task_id, "token": token})
                        return key, token
                    except DuplicateKeyError:
                        continue
            stale = {
                d["_id"]
                for d in self.tasks.find(
                    {"_id": {"$in": list(set(taken.values()))}, "state": {"$in": [s.value for s in FINISHED]}},
                    {"_id": 1},
                )
            }
            if not stale:
                return None
            for key, task in taken.items():
                if task in stale:
                    self.slots.delete_one({"_id": key, "task": task})
        return None

    def _free_slot(self, task_id, job_id, entry=None):
        """Give back the run slot `entry` ((`_id`, token)), or every slot `task_id` holds."""
        if entry is not None:
            self.slots.delete_one({"_id": entry[0], "token": entry[1]})
        else:
            self.slots.delete_many({"job": job_id, "task": task_id})

    def finish(self, task_id, worker_id, attempt, outcome, exit_code=None, usage=None, doc=None):
        """End an attempt as its worker reports it, then apply the rules:
        success releases continuations; a failure with retries left requeues
        the task; otherwise it ends and its continuations are cancelled.
        `doc`: the whole task as the caller just read it (it is read again
        only if it changed meanwhile). Returns the task as stored after the change."""
        if outcome not in WORKER_OUTCOMES + (ABANDONED,):
            raise TransitionError("unknown outcome '%s'; one of %s" % (outcome, ", ".join(WORKER_OUTCOMES)))
        while True:
            if doc is None:
                doc = self.tasks.find_one({"_id": task_id})
            if doc is None:
                raise NotFound("task '%s' does not exist" % task_id)
            history = doc.get("history") or []
            if (
                doc["state"] not in HELD
                or doc.get("worker") != worker_id
                or not history
                or history[-1]["attempt"] != attempt
            ):
                raise Conflict(
                    "task '%s' is not running attempt %s on worker '%s' (it is '%s')"
                    % (task_id, attempt, worker_id, doc["state"])
                )
            if outcome == CANCELLED and doc.get("cancel_reason") == TIMEOUT:
                outcome = TIMEOUT  # the server cancelled it for exceeding its time limit
            changes = self._outcome_changes(doc, outcome)
            index = len(history) - 1
            now = utcnow()
            sets = {
                "history.%d.ended" % index: now,
                "history.%d.runtime" % index: seconds_between(history[-1].get("started"), now),
                "history.%d.exit_status" % index: outcome,
                "history.%d.exit_code" % index: exit_code,
                **stamp(now),
                **changes,
            }
            if usage:
                sets["history.%d.usage" % index] = usage
            held = {
                "_id": task_id,
                "state": doc["state"],
                "worker": worker_id,
                "retry_count": doc.get("retry_count", 0),
                "history": {"$size": len(history)},
                # tasks stored before `lost_count` existed have none
                "lost_count": doc["lost_count"] if "lost_count" in doc else {"$exists": False},
            }
            if changes.get("cascade_pending") and not doc.get("continuations"):
                # Nothing to cascade to: no marker, no cascade (while no
                # continuation is added meanwhile: else this update misses
                # and the loop reads the task again).
                del changes["cascade_pending"], sets["cascade_pending"]
                held["continuations.0"] = {"$exists": False}
            updated = self.tasks.find_one_and_update(held, {"$set": sets}, return_document=ReturnDocument.AFTER)
            if updated is not None:
                break
            doc = None  # changed since it was read: read it again
        if outcome != SUCCESS:
            self.drop_children(task_id, attempt)
        if updated["state"] in FINISHED:
            self.on_finished(task_id)
        if updated.get("array_limit"):
            self._free_slot(task_id, updated.get("job"))
        if updated.get("cascade_pending"):
            self._cascade(task_id, updated)
        elif is_ready(updated):
            self._became_ready(updated)
        return updated

    def keep_late_report(self, task_id, worker_id, attempt, outcome, exit_code=None, usage=None):
        """A report of an attempt the server gave up before it arrived (its
        worker was marked lost, or its claim was thought unanswered): the
        task has moved on, so the report changes nothing but is kept in
        that attempt's history entry as `late_report` (the first one, if it
        is repeated). Returns the task, or None when attempt `attempt` of
        the task was not given to `worker_id` or was not given up."""
        doc = self.tasks.find_one({"_id": task_id}, {"history": 1})
        history = (doc or {}).get("history") or []
        if not 1 <= attempt <= len(history):
            return None
        entry = history[attempt - 1]
        if entry.get("attempt") != attempt or entry.get("worker") != worker_id or entry.get("exit_status") != ABANDONED:
            return None
        if entry.get("late_report") is None:
            late = {"outcome": outcome, "exit_code": exit_code, "received": utcnow()}
            if usage:
                late["usage"] = usage
            log.warning(
                "task %s attempt %s: report %r arrived after the attempt was abandoned; kept", task_id, attempt, outcome
            )
            # An ended attempt's entry changes no more (attempts are only
            # appended), so its position is precondition enough; no new
            # `_etag`: nothing a user set changed.
            self.tasks.update_one({"_id": task_id}, {"$set": {"history.%d.late_report" % (attempt - 1): late}})
        return self.tasks.find_one({"_id": task_id})

    def give_back(self, task_id, worker_id, attempt, erase=False):
        """A claim whose worker was marked lost before the answer reached
        it: the task returns to `available` and the attempt ends as
        abandoned, without using a retry (it never ran). False if the task
        moved on meanwhile. `erase`: a prefetched task its worker hands back
        unstarted; the attempt is removed (the next claim makes the same
        attempt number), as if this worker had never claimed it."""
        index, now = attempt - 1, utcnow()
        held = {"_id": task_id, "state": S.RUNNING.value, "worker": worker_id, "history": {"$size": attempt}}
        doc = self.tasks.find_one(held, {"history.started": 1})
        if doc is None:
            return False
        started = doc["history"][index].get("started")
        if erase:
            changes = {"$set": {"state": S.AVAILABLE.value, "worker": None, **stamp(now)}, "$pop": {"history": 1}}
            if attempt == 1:
                changes["$unset"] = {"queue_wait": ""}  # set again by the next first claim
        else:
            changes = {
                "$set": {
                    "state": S.AVAILABLE.value,
                    "worker": None,
                    "history.%d.ended" % index: now,
                    "history.%d.runtime" % index: seconds_between(started, now),
                    "history.%d.exit_status" % index: ABANDONED,
                    **stamp(now),
                }
            }
        updated = self.tasks.find_one_and_update(held, changes, return_document=ReturnDocument.AFTER)
        if updated is not None and updated.get("array_limit"):
            self._free_slot(task_id, updated.get("job"))
        if updated is not None and is_ready(updated):
            self._became_ready(updated)
        return updated is not None

    @staticmethod
    def _outcome_changes(doc, outcome):
        """The task fields an attempt's outcome leads to (the retry rule)."""
        if outcome == SUCCESS:
            return {"state": S.TERMINATED.value, "exit_status": SUCCESS, "worker": None, "cascade_pending": True}
        if outcome == CANCELLED or (outcome == TIMEOUT):
            return {"state": S.CANCELLED.value, "exit_status": outcome, "worker": None, "cascade_pending": True}
        if outcome == ABANDONED and doc["state"] == S.PENDING_CANCELLATION:
            # Its cancellation was asked for; the lost worker cannot report it.
            return {
                "state": S.CANCELLED.value,
                "exit_status": doc.get("cancel_reason") or CANCELLED,
                "worker": None,
                "cascade_pending": True,
            }
        grown = TaskQueue._grown_memory(doc) if outcome == OOM and doc["state"] == S.RUNNING else None
        if grown is not None:
            return {
                "state": S.AVAILABLE.value,
                "memory_retry_count": doc.get("memory_retry_count", 0) + 1,
                "requested_resources.memory": grown,
                "exit_status": outcome,
                "worker": None,
            }
        if outcome == ABANDONED:
            # The worker was lost, not the task at fault: its own count and limit.
            lost = doc.get("lost_count", 0)
            if lost < doc.get("max_lost", DEFAULT_MAX_LOST):
                return {"state": S.AVAILABLE.value, "lost_count": lost + 1, "exit_status": outcome, "worker": None}
            return {"state": S.TERMINATED.value, "exit_status": outcome, "worker": None, "cascade_pending": True}
        retries_left = doc.get("retry_count", 0) < doc.get("max_retries", 0)
        if retries_left and doc["state"] == S.RUNNING:
            return {
                "state": S.AVAILABLE.value,
                "retry_count": doc.get("retry_count", 0) + 1,
                "exit_status": outcome,
                "worker": None,
            }
        return {"state": S.TERMINATED.value, "exit_status": outcome, "worker": None, "cascade_pending": True}

    @staticmethod
    def _grown_memory(doc):
        """The memory an `oom` attempt is retried with (`retry_memory_factor`
        times more, at most `MAX_MEMORY_RETRIES` times), or None: no retry."""
        factor = doc.get("retry_memory_factor")
        memory = (doc.get("requested_resources") or {}).get("memory") or 0
        if not factor or factor <= 1 or memory <= 0 or doc.get("memory_retry_count", 0) >= MAX_MEMORY_RETRIES:
            return None
        grown = int(math.ceil(memory * factor))
        return grown if grown <= MAX_MEMORY else None

    def abandon(self, worker_id):
        """A lost worker's tasks: end their attempts as abandoned and apply
        the retry rules, exactly as if the worker had reported a failure."""
        ended = []
        for doc in self.tasks.find({"worker": worker_id, "state": {"$in": [s.value for s in HELD]}}, {"history": 1}):
            attempt = doc["history"][-1]["attempt"] if doc.get("history") else None
            try:
                ended.append(self.finish(doc["_id"], worker_id, attempt, ABANDONED))
            except TransitionError:
                continue  # finished or abandoned meanwhile by someone else
        return ended

    def cancel(self, task_id, exit_status=CANCELLED, cascade=True, only_if=None, cancelled_by=None):
        """Cancel a task from any state: at once when it is not running, by
        way of `pending_cancellation` when a worker holds it. Finished tasks
        are left alone, and so is the task once it no longer matches
        `only_if` (a filter). A task cancelled at once stops waiting for its
        parents; `cancelled_by` says which parent's end ruled it out.
        Returns the state written, or None if nothing was."""
        while True:
            doc = self.tasks.find_one(dict(only_if or {}, _id=task_id), {"state": 1, "job": 1, "array_limit": 1})
            if doc is None:
                return None
            state = S(doc["state"])
            if state in FINISHED or state == S.PENDING_CANCELLATION:
                return None
            target = stored_state(state, S.CANCELLED)
            sets = {"state": target.value, **stamp()}
            if target == S.CANCELLED:
                sets.update(
                    exit_status=exit_status,
                    cascade_pending=True,
                    pending_parents=[],
                    pending_dependency_count=0,
                    cancelled_by=cancelled_by,
                )
            else:
                sets["cancel_reason"] = exit_status  # what `finish` records when the worker reports
            if self.tasks.update_one(
                dict(only_if or {}, _id=task_id, state=state.value), {"$set": sets}
            ).modified_count:
                if target == S.CANCELLED:
                    self.on_finished(task_id)
                    if doc.get("array_limit"):
                        self._free_slot(task_id, doc.get("job"))
                    if cascade:
                        self._cascade(task_id)
                return target

    # -- cascades ---------------------------------------------------------

    def _cascade(self, task_id, doc=None):
        """Propagate finished tasks to their continuations, breadth first,
        then clear `cascade_pending`. Safe to repeat after a crash. `doc`:
        the task as its terminal write stored it, so as not to read it again
        (it cannot change meanwhile: a retry waits for `cascade_pending`)."""
        queue = [task_id]
        while queue:
            current = queue.pop(0)
            if doc is None or doc["_id"] != current:
                doc = self.tasks.find_one(
                    {"_id": current}, {"state": 1, "exit_status": 1, "continuations": 1, "name": 1}
                )
            if doc is None:
                continue
            if doc["state"] in FINISHED:  # (not if it was retried meanwhile)
                queue += self._settle_all(doc, list(dict.fromkeys(doc.get("continuations") or [])))
            self.tasks.update_one({"_id": current, "cascade_pending": True}, {"$set": {"cascade_pending": False}})

    def _settle_all(self, parent, child_ids):
        """`_settle` each of `child_ids`; returns those that finished by it.
        Of a wide fan-out (more than FIND_IN_ONE_BY_ONE children), those
        whose last parent this is are released in bulk first
        (`_release_last_all`); the others are settled one at a time."""
        finished: list = []
        if len(child_ids) > FIND_IN_ONE_BY_ONE:
            child_ids, finished = self._release_last_all(parent, child_ids)
        return finished + [child for child in child_ids if self._settle(parent, child)]

    def _release_last_all(self, parent, child_ids):
        """Release at once the children of `parent` that wait for it alone
        and that its end lets run, as `_settle` and `_release` would one by
        one: an update of the inactive ones (to `available`), one of those
        created available, and one read of what they released (each write
        marks its documents with an `_etag` of its own). A 1 -> 500 fan-out
        cost three requests to the store per child, all in the parent's
        report. Returns (children left for `_settle`, children that finished
        by it: barriers). A crash between the writes and the read leaves
        nothing undone that `_settle`, repeating the cascade, does not do."""
        pid = parent["_id"]
        last = {
            "_id": {"$in": child_ids},
            "pending_parents": pid,
            "pending_dependency_count": 1,
            **self._satisfied_edge(parent),
        }
        unlink = {"$pull": {"pending_parents": pid}, "$inc": {"pending_dependency_count": -1}}
        released, unlinked = stamp(), stamp()
        changed = self.tasks.update_many(
            dict(last, state=S.INACTIVE.value), dict(unlink, **{"$set": {"state": S.AVAILABLE.value, **released}})
        ).modified_count
        marks = [released["_etag"]]
        if changed < len(child_ids):
            self.tasks.update_many(last, dict(unlink, **{"$set": unlinked}))
            marks.append(unlinked["_etag"])
        finished, done = [], set()
        for doc in find_in(self.tasks, "_id", child_ids, {"_etag": {"$in": marks}}):
            done.add(doc["_id"])
            if is_ready(doc) and self._became_ready(doc, cascade=False):
                finished.append(doc["_id"])
        return [child for child in child_ids if child not in done], finished

    @staticmethod
    def _satisfied_edge(parent):
        """The filter on a child of the finished `parent` that holds when the
        edge's kind (`edge_kind`: the child's `after_any`, `after_failure`)
        lets the child run after the parent's end (`edge_satisfied`)."""
        pid = parent["_id"]
        if edge_satisfied(SUCCESS_KIND, parent):
            return {"after_failure": {"$ne": pid}}
        return {"$or": [{"after_any": pid}, {"after_failure": pid}]}

    def _settle(self, parent, child_id, release=True):
        """The finished `parent` decides the edge to `child_id` by its kind:
        the child stops waiting for it (and runs if it was its last parent),
        or, if the parent's end rules the child out, the child is cancelled
        with `cancelled_by` naming the parent. True when the child finished
        by it (cancelled, or a barrier), so its own continuations need a cascade."""
        if self._unlink_not_last(parent, child_id):
            return False
        child = self.tasks.find_one({"_id": child_id}, {"after_any": 1, "after_failure": 1})
        if child is None:
            return False
        kind = edge_kind(child, parent["_id"])
        if edge_satisfied(kind, parent):
            released = self._unlink(parent["_id"], child_id, release=release)
            if released is None:
                # Unlinked already: by a cascade that a crash cut
                # short, perhaps before it released the child.
                released = self.tasks.find_one({"_id": child_id, "pending_parents": {"$ne": parent["_id"]}})
            if release and released is not None and released.get("pending_dependency_count") == 0:
                return self._release(released)
            return False
        because = {
            "task": parent["_id"],
            "name": parent.get("name"),
            "exit_status": parent.get("exit_status") or parent.get("state"),
            "needed": kind,
        }
        return (
            self.cancel(child_id, cascade=False, only_if={"pending_parents": parent["_id"]}, cancelled_by=because)
            == S.CANCELLED
        )

    def _unlink_not_last(self, parent, child_id):
        """`_settle`'s common case in one write and no read: the parent's
        end satisfies the edge (by the kind the child's fields give it) and
        the child still waits for other parents, so it only stops waiting
        for this one. False when the update matches nothing: the child
        decides otherwise, or this was its last parent, or the edge was
        settled already; `_settle` then reads the child. Each parent of a
        1 -> 500 -> 1 graph read the sink, 500 ids long, and wrote it back
        whole with its answer: a third of the CPU of a finished task."""
        pid = parent["_id"]
        query = {
            "_id": child_id,
            "pending_parents": pid,
            "pending_dependency_count": {"$gt": 1},
            **self._satisfied_edge(parent),
        }
        return bool(
            self.tasks.update_one(
                query, {"$pull": {"pending_parents": pid}, "$inc": {"pending_dependency_count": -1}}
            ).modified_count
        )

    def _release(self, doc):
        """A task whose last parent finished: an inactive one becomes
        available; a ready one is announced. True if it finished at once
        (a barrier), so its own continuations need a cascade."""
        if doc["state"] == S.INACTIVE:
            doc = self.tasks.find_one_and_update(
                {"_id": doc["_id"], "state": S.INACTIVE.value, "pending_dependency_count": 0},
                {"$set": {"state": S.AVAILABLE.value, **stamp()}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                return False
        if is_ready(doc):
            return self._became_ready(doc, cascade=False)
        return False

    def _became_ready(self, doc, cascade=True):
        """A task became claimable. A barrier (no command) succeeds at once;
        anything else is announced to waiting claims. Returns True for a
        barrier that finished."""
        if doc.get("command"):
            if self._shared:
                self._shared.add(doc)
            self.on_ready(doc)
            return False
        done = self.tasks.update_one(
            {"_id": doc["_id"], "state": S.AVAILABLE.value, "pending_dependency_count": 0},
            {"$set": {"state": S.TERMINATED.value, "exit_status": SUCCESS, "cascade_pending": True, **stamp()}},
        )
        if not done.modified_count:
            return False
        self.on_finished(doc["_id"])
        if cascade:
            self._cascade(doc["_id"])
        return True

    def upgrade_stored(self):
        """Bring what an earlier Banyan stored up to date, at start: tasks
        stored before `held` existed are not held (the claim index matches
        `held: false` by equality), and get the figures claims and finishes
        now keep (`fill_stored_figures`). Each upgrade reads every task, so
        each runs once per store: a document in `upgrades` records it done
        (a restart on FerretDB took over 30 s reading them again). Two
        servers starting at once may both run one; each is idempotent."""
        upgrades = self.db["upgrades"]
        steps = [
            ("held", lambda: self.tasks.update_many({"held": {"$exists": False}}, {"$set": {"held": False}})),
            ("stored_figures", self.fill_stored_figures),
        ]
        for name, step in steps:
            if upgrades.find_one({"_id": name}, {"_id": 1}) is None:
                step()
                try:
                    upgrades.insert_one({"_id": name, "done": utcnow()})
                except DuplicateKeyError:
                    pass

    def resume_cascades(self):
        """Finish cascades that a crash interrupted (run at start and by the reaper)."""
        for doc in self.tasks.find({"cascade_pending": True}, {"_id": 1}):
            self._cascade(doc["_id"])

    def fill_stored_figures(self):
        """Tasks stored by an earlier version lack the figures claims and
        finishes now keep (`queue_wait`, each ended attempt's `runtime`):
        compute them (once per store: `upgrade_stored`)."""
        for doc in self.tasks.find(
            {"history.0": {"$exists": True}, "queue_wait": {"$exists": False}}, {"history": 1, "_created": 1}
        ):
            history = doc["history"]
            sets = {"queue_wait": seconds_between(doc.get("_created"), history[0].get("started"))}
            for index, entry in enumerate(history):
                if entry.get("ended") is not None and "runtime" not in entry:
                    sets["history.%d.runtime" % index] = seconds_between(entry.get("started"), entry["ended"])
            self.tasks.update_one({"_id": doc["_id"], "queue_wait": {"$exists": False}}, {"$set": sets})

    # -- workers: batch claims, heartbeats, time limits --------------------

    def claim_batch(self, worker_id, free, max_tasks, host=None, each=None):
        """Claim, one atomic claim at a time, up to `max_tasks` ready tasks
        that together fit `free` (highest priority first, then oldest; a task
        too big for what is left is skipped for a smaller one). `each`: what
        no one of them may ask more than; `free` is then not a limit (a
        worker's prefetch: each task fits the worker, started in turn).
        Once it has claimed one, it answers after CLAIM_BATCH_SECONDS with
        what it has (a claimer asks again for more): on a slow store each
        claim is a write under a lock, and a batch of 32 could outlast the
        client's patience."""
        if each is not None:
            free = {key: max_tasks * each.get(key, 0) for key in RESOURCES}
        left = {key: free.get(key, 0) for key in RESOURCES}
        claimed: list = []
        full: set = set()
        busy: set = set()
        deadline = time.monotonic() + CLAIM_BATCH_SECONDS
        while len(claimed) < max_tasks and not (claimed and time.monotonic() > deadline):
            want = _round_size(left, max_tasks - len(claimed))
            got = self._claim_some(worker_id, left, want, host, full, busy, each, deadline)
            if got is None:
                break
            claimed += got
        return claimed

    def record_usage(self, task_id, worker_id, attempt, usage=None, progress=None):
        """Write a heartbeat's usage and progress into the task's current
        attempt. False when `worker_id` no longer holds that attempt (the
        task was requeued, finished or given to another worker)."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            return False
        held = {
            "_id": task_id,
            "worker": worker_id,
            "state": {"$in": [s.value for s in HELD]},
            "history": {"$size": attempt},
        }
        now = utcnow()
        sets = {"history.%d.seen" % (attempt - 1): now}
        if usage is not None:
            sets["history.%d.usage" % (attempt - 1)] = dict(usage, updated=now)
        if progress is not None:
            sets["history.%d.progress" % (attempt - 1)] = dict(progress, updated=now)
        # No new `_etag`: usage is monitoring, and a user's cancel PATCH
        # racing a heartbeat should not lose on the etag precondition.
        return self.tasks.update_one(held, {"$set": sets}).matched_count == 1

    def abandon_unconfirmed(self, worker_id, reported, claimed_before):
        """End the attempts `worker_id` holds that none of its heartbeats
        ever reported (their `seen` is unset) and that were claimed before
        `claimed_before`, other than those in `reported` (this heartbeat's).

        Such a claim was written but its answer never reached the worker
        (the server was killed, or the connection broke, after the write):
        the worker does not know it holds the task and nothing will ever run
        or report it. It ends as abandoned and the retry rules apply, as for
        a lost worker. Returns the tasks as stored after the change."""
        ended = []
        for doc in self.tasks.find({"worker": worker_id, "state": {"$in": [s.value for s in HELD]}}, {"history": 1}):
            last = (doc.get("history") or [None])[-1]
            if doc["_id"] in reported or not last or last.get("seen") is not None:
                continue
            started = last.get("started")
            if started is None:
                continue
            if aware(started) >= claimed_before:
                continue
            log.warning(
                "task %s attempt %s: claimed by worker %s at %s, never reported by its heartbeats; abandoned",
                doc["_id"],
                last["attempt"],
                worker_id,
                started,
            )
            try:
                ended.append(self.finish(doc["_id"], worker_id, last["attempt"], ABANDONED))
            except TransitionError:
                continue  # reported or finished meanwhile
        return ended

    def pending_cancellations(self, worker_id):
        """Ids of the tasks `worker_id` holds that it is asked to stop."""
        return [
            doc["_id"]
            for doc in self.tasks.find({"worker": worker_id, "state": S.PENDING_CANCELLATION.value}, {"_id": 1})
        ]

    def held_by(self, worker_ids, visible=None):
        """Ids of the tasks held (running or being cancelled) by each of
        `worker_ids`, of those `visible` (a filter, such as a user's own) selects."""
        held: dict = {wid: [] for wid in worker_ids}
        if held:
            query: dict = {"worker": {"$in": list(held)}, "state": {"$in": [s.value for s in HELD]}}
            if visible:
                query = {"$and": [query, visible]}
            for doc in self.tasks.find(query, {"worker": 1}):
                held.setdefault(doc["worker"], []).append(doc["_id"])
        return held

    def unfinished(self, task_ids, visible=None):
        """{id: state} of those of `task_ids` (that match `visible`, the
        caller's view) that have not finished."""
        query = dict(visible or {}, _id={"$in": list(task_ids)}, state={"$nin": [s.value for s in FINISHED]})
        return {doc["_id"]: doc["state"] for doc in self.tasks.find(query, {"state": 1})}

    def cancel_overdue(self, worker_ids, now=None):
        """Running tasks of `worker_ids` past their `time_limit` go to
        `pending_cancellation` with reason `timeout`; their worker stops them
        and its report ends the attempt as `timeout`. Returns their ids."""
        now = now or utcnow()
        if not worker_ids:
            return []
        overdue = []
        for doc in self.tasks.find(
            {"worker": {"$in": list(worker_ids)}, "state": S.RUNNING.value, "time_limit": {"$gt": 0}},
            {"time_limit": 1, "history": 1},
        ):
            started = (doc.get("history") or [{}])[-1].get("started")
            if started is None:
                continue
            if (now - aware(started)).total_seconds() >= doc["time_limit"]:
                # only the attempt read here: a retry claimed meanwhile has its own time
                attempt = doc["history"][-1].get("attempt")
                if self.cancel(doc["_id"], exit_status=TIMEOUT, only_if={"history": {"$size": attempt}}) is not None:
                    overdue.append(doc["_id"])
        return overdue
