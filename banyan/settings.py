"""Eve settings for the Banyan server: the task schema, indexes and defaults.

`VIRTUAL_RESOURCES` declares fields that are read or written through
endpoints of their own (see `banyan.server.virtual`).
"""

from banyan.protocol import DEFAULT_MAX_LOST, EXIT_STATUSES, INT64_MAX, WORKER_STATES, TaskState

OBJECTID_LIST = {"type": "list", "schema": {"type": "objectid"}}

#: The longest duration a task may give, in seconds (longer ones overflow dates).
TEN_YEARS = 10 * 366 * 86400

#: User fields that may change only while a task is `inactive`, and those
#: that may change while it is queued (`inactive` or `available`), never once
#: a worker holds it or it has finished (the rule: `states.check_field_change`).
WRITE_ONCE = {"write_once": True}
QUEUED_ONLY = {"queued_only": True}
#: Parents of a task given at its creation, one list per kind of dependency:
#: `after` runs once they all succeeded (the same edge as the parent's
#: `continuations`), `after_any` once they ended whatever their outcome,
#: `after_failure` once they ended other than in success.
PARENTS = {
    "type": "list",
    "maxlength": 10000,
    "schema": {"type": "objectid"},
    "creation_only": True,
    "data_relation": {"resource": "tasks", "field": "_id"},
}

task_schema = {
    "name": {"type": "string", "maxlength": 1024, "nullable": True, **WRITE_ONCE},
    "command": {
        "type": ["string", "list"],
        "nullable": True,
        "maxlength": 1 << 20,
        "schema": {"type": "string", "maxlength": 1 << 20},
        **WRITE_ONCE,
    },
    "requested_resources": {
        "type": "dict",
        "default": {},
        "schema": {
            "cores": {"type": "number", "min": 0, "default": 1},
            "memory": {"type": "integer", "min": 0, "max": INT64_MAX, "coerce": "bytes", "default": 0},
            "gpus": {"type": "integer", "min": 0, "default": 0},
        },
        **QUEUED_ONLY,
    },
    "environment": {
        "type": "dict",
        "keysrules": {"type": "string", "regex": r"[A-Za-z_][A-Za-z0-9_]*"},
        "valuesrules": {"type": "string"},
        **WRITE_ONCE,
    },
    "working_directory": {"type": "string", "nullable": True, **WRITE_ONCE},
    "max_retries": {"type": "integer", "min": 0, "max": 1000, "default": 0, **QUEUED_ONLY},
    # An attempt killed for exceeding its memory (outcome `oom`) is retried with
    # this many times more memory, up to states.MAX_MEMORY_RETRIES times; null or 1: not retried so.
    "retry_memory_factor": {"type": "number", "min": 1, "max": 1024, "nullable": True, "default": None, **WRITE_ONCE},
    # Attempts the task may lose to lost workers before it fails (see `lost_count`).
    "max_lost": {"type": "integer", "min": 0, "max": 1000, "default": DEFAULT_MAX_LOST, **WRITE_ONCE},
    "max_shutdown_time": {"type": "number", "min": 0, "max": 86400, "default": 10, **WRITE_ONCE},
    # None for no limit; 0 would be a limit nobody could meet, so it is refused.
    "time_limit": {"type": "number", "above": 0, "max": TEN_YEARS, "nullable": True, "default": None, **QUEUED_ONLY},
    "estimated_runtime": {"type": "number", "min": 0, "max": TEN_YEARS, "nullable": True, **WRITE_ONCE},
    "priority": {"type": "integer", "default": 0, **QUEUED_ONLY},
    # A held task is never claimed (`banyan hold` / `banyan release`).
    "held": {"type": "boolean", "default": False, **QUEUED_ONLY},
    "after": dict(PARENTS),
    "after_any": dict(PARENTS),
    "after_failure": dict(PARENTS),
    # The submission the task belongs to; without one, each POST makes a job.
    "job": {"type": "objectid", "creation_only": True, "data_relation": {"resource": "jobs", "field": "_id"}},
    "continuations": {
        "type": "list",
        "maxlength": 10000,  # before `schema`: a longer list is refused without a look at each id
        "schema": {"type": "objectid"},
        "default": [],
        "creation_only": True,
        # `continuation`: each must be in the state the state machine requires
        # of a continuation (`states.CONTINUATION_STATE`)
        "data_relation": {"resource": "tasks", "field": "_id", "continuation": True},
    },
    "state": {
        "type": "string",
        "allowed": [s.value for s in TaskState],
        "default": TaskState.INACTIVE.value,
        "transition": True,
    },
    # The seed's per-item claim names the worker; the server checks it.
    "worker": {"type": "objectid", "nullable": True, "writable_by": ["worker", "admin"]},
    "pending_dependency_count": {"type": "integer", "readonly": True},
    "pending_parents": {**OBJECTID_LIST, "readonly": True},
    "retry_count": {"type": "integer", "readonly": True},
    "memory_retry_count": {"type": "integer", "readonly": True},
    "lost_count": {"type": "integer", "readonly": True},
    "exit_status": {"type": "string", "nullable": True, "readonly": True, "allowed": list(EXIT_STATUSES)},
    "owner": {"type": "string", "nullable": True, "readonly": True},
    "history": {"type": "list", "readonly": True},
    "cascade_pending": {"type": "boolean", "readonly": True},
    # Why a running task is being cancelled (`timeout` when past its time limit).
    "cancel_reason": {"type": "string", "nullable": True, "readonly": True},
    # A task cancelled because a parent's outcome ruled it out:
    # {"task": id, "name": ..., "exit_status": ..., "needed": "success" | "failure"}.
    "cancelled_by": {"type": "dict", "nullable": True, "readonly": True},
    # Copied from the job at creation: at most this many of its tasks run at once.
    "array_limit": {"type": "integer", "nullable": True, "readonly": True},
    # A task added by a running task (`banyan submit --child`): that task,
    # which must be running; the child joins its job, and the continuations
    # of the adding task wait for it too (see states.TaskQueue.prepare_children).
    "added_by": {
        "type": "objectid",
        "nullable": True,
        "creation_only": True,
        "data_relation": {"resource": "tasks", "field": "_id"},
    },
    # The attempt of `added_by` that added it; a retry replaces what a failed attempt added.
    "added_in_attempt": {"type": "integer", "nullable": True, "readonly": True},
    # 0 for a task submitted from outside, its adder's depth + 1 for a child.
    "depth": {"type": "integer", "readonly": True},
    # The attempt that added it ended without success: cancelled and no
    # longer waited for (a later attempt adds its own).
    "superseded": {"type": "boolean", "readonly": True},
}

tasks = {
    "schema": task_schema,
    "resource_methods": ["GET", "POST"],
    "item_methods": ["GET", "PATCH"],
    "bulk_enabled": True,
    # Users see and change only their own tasks (Eve adds `owner == name` to
    # their every query); admins and workers are not restricted.
    "auth_field": "owner",
    # Roles per method (when AUTH is on). Workers read tasks and claim them
    # by PATCH (the seed's protocol) but never create them; what a worker's
    # PATCH may contain is checked by `states.TaskQueue.authorize_update`.
    # Attempt tokens (a running task's) read their job's tasks and add to
    # it: `auth.ATTEMPT_ROUTES` and `auth.confine_attempt_reads`.
    "allowed_read_roles": ["admin", "user", "worker", "attempt"],
    "allowed_write_roles": ["admin", "user", "attempt"],
    "allowed_item_read_roles": ["admin", "user", "worker", "attempt"],
    "allowed_item_write_roles": ["admin", "user", "worker"],
    "mongo_indexes": {
        # The claim: ready tasks not held, highest priority first, then oldest
        # (`_id` orders the tasks of one bulk POST, which share `_created`).
        "ready_in_order": [
            ("state", 1),
            ("pending_dependency_count", 1),
            ("held", 1),
            ("priority", -1),
            ("_created", 1),
            ("_id", 1),
        ],
        # The claim once no core is left: ready tasks of no core.
        "ready_coreless_in_order": [
            ("state", 1),
            ("pending_dependency_count", 1),
            ("held", 1),
            ("requested_resources.cores", 1),
            ("priority", -1),
            ("_created", 1),
            ("_id", 1),
        ],
        # A task's parents (who lists it among its continuations).
        "parents": [("continuations", 1)],
        "owner": [("owner", 1), ("state", 1)],
        # GET /changes: the latest change, of all tasks and of a user's.
        "updated": [("_updated", -1), ("_id", -1)],
        "owner_updated": [("owner", 1), ("_updated", -1), ("_id", -1)],
        "worker": [("worker", 1), ("state", 1)],
        "cascade": [("cascade_pending", 1)],
        "job": [("job", 1), ("state", 1)],
        # The children an attempt added (`added_by`), replaced when it fails.
        "added_by": [("added_by", 1), ("added_in_attempt", 1)],
        # `/stats`' throughput: the attempts that ended in the last hour.
        "ended": [("history.ended", 1)],
    },
}

# A job: one submission (a task, an array, a graph). Its tasks name it in
# `job`; reads add their counts per state (banyan.server.jobs).
jobs = {
    "schema": {
        "name": {"type": "string", "maxlength": 1024, "nullable": True},
        # `--array 1-100%4`: at most this many of its tasks run at once.
        "array_limit": {"type": "integer", "min": 1, "nullable": True, "default": None},
        "owner": {"type": "string", "nullable": True, "readonly": True},
        # Caps on a graph that grows while it runs (`banyan submit --max-tasks/--max-depth`):
        # tasks its running tasks may add in all, and how deep children may nest
        # (null: states.DEFAULT_MAX_ADDED, states.DEFAULT_MAX_DEPTH).
        "max_tasks": {"type": "integer", "min": 0, "max": 1000000, "nullable": True, "default": None},
        "max_depth": {"type": "integer", "min": 0, "max": 1000, "nullable": True, "default": None},
        # How many tasks its running tasks added so far.
        "added_tasks": {"type": "integer", "readonly": True},
    },
    "resource_methods": ["GET", "POST"],
    "item_methods": ["GET"],
    "auth_field": "owner",
    "allowed_read_roles": ["admin", "user", "worker", "attempt"],
    "allowed_write_roles": ["admin", "user"],
    "allowed_item_read_roles": ["admin", "user", "worker", "attempt"],
    "allowed_item_write_roles": ["admin", "user"],
    "mongo_indexes": {"owner": [("owner", 1)]},
}

# Registered workers and attempts' output: stored collections with no Eve
# URL of their own (banyan.server.claims serves them).
workers = {
    "internal_resource": True,
    "schema": {
        "host": {"type": "string"},
        "resources": {"type": "dict"},
        "state": {"type": "string", "allowed": [s.value for s in WORKER_STATES]},
        "registered": {"type": "datetime"},
        "last_heartbeat": {"type": "datetime"},
        "stopped": {"type": "datetime", "nullable": True},
        "lost": {"type": "datetime", "nullable": True},
        "token_id": {"type": "string", "nullable": True},
    },
    # `GET /workers?where=` may filter on these (not on the token that registered a worker).
    "allowed_filters": ["_id", "host", "resources", "state", "registered", "last_heartbeat", "stopped", "lost"],
    "mongo_indexes": {
        # The reaper: active workers silent since before the cutoff.
        "liveness": [("state", 1), ("last_heartbeat", 1)],
        "abandon": [("abandon_pending", 1)],
    },
}

logs = {
    "internal_resource": True,
    "schema": {
        "task": {"type": "objectid"},
        "attempt": {"type": "integer"},
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
    },
    "mongo_indexes": {"attempt": ([("task", 1), ("attempt", -1)], {"unique": True})},
}

# Run slots of jobs with an `array_limit` (banyan.server.states: one
# document per slot taken, "<job id>/<n>", so taking one is an insert).
slots = {
    "internal_resource": True,
    "schema": {"job": {"type": "objectid"}, "task": {"type": "objectid"}, "token": {"type": "string"}},
    "mongo_indexes": {"job": [("job", 1), ("task", 1)]},
}

DOMAIN = {"tasks": tasks, "jobs": jobs, "slots": slots, "workers": workers, "logs": logs}

#: Virtual fields, read or written through endpoints of their own.
VIRTUAL_RESOURCES = {
    # POST /tasks/add_continuations, POST /tasks/<id>/add_continuations, PATCH {"add_continuations": [...]}
    "add_continuations": {
        "kind": "append",
        "target": "continuations",
        "allows_duplicates": False,
        "writable_by": ["admin", "user"],
    },
    "remove_continuations": {"kind": "remove", "target": "continuations", "writable_by": ["admin", "user"]},
    # GET /tasks/current_history, ?projection={"current_history": 1}: the last attempt.
    "current_history": {"kind": "alias", "target": "history", "element": -1, "readonly": True},
    # Read-write alias of `priority`: reprioritise many tasks in one request.
    "rank": {"kind": "alias", "target": "priority", "writable_by": ["admin", "user"]},
}

# Eve: no `If-Match` needed from curl; `_etag` is still stored and used as a
# write precondition, and lost races answer 409 from the data layer.
ENFORCE_IF_MATCH = False
IF_MATCH = True
PAGINATION_LIMIT = 10000
#: ISO 8601 in UTC with microseconds: attempts last milliseconds, and Eve's
#: default (RFC 1123) would round every start and end to the second.
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
PAGINATION_DEFAULT = 100
MONGO_DBNAME = "banyan"
# Token authentication (see banyan.server.auth). `banyan server` turns it on
# unless it runs on loopback with the embedded store.
AUTH = False
# Oversized bodies are refused (413) before they are parsed.
MAX_CONTENT_LENGTH = 64 * 1024 * 1024
#: Bodies nested deeper than this are refused (422); see banyan.server.limits.
MAX_JSON_DEPTH = 32
# No relation is embeddable, so `?embedded=` has nothing to do (and Eve
# would parse it with no guard on its nesting).
EMBEDDING = False
RENDERERS = ["eve.render.JSONRenderer"]

#: Seconds an `Idempotency-Key` of `POST /tasks` is remembered (at least a
#: day; see banyan.server.idempotency).
IDEMPOTENCY_TTL = 2 * 86400

# Workers and claims (banyan.server.claims, banyan.server.reaper).
#: Seconds of silence after which a worker is marked lost.
HEARTBEAT_TIMEOUT = 30
#: Bytes kept of each attempt's stdout and of its stderr (the last ones).
LOG_CAP = 1024 * 1024
#: Longest a claim is held open (long poll), in seconds.
CLAIM_MAX_WAIT = 30
#: Seconds between re-checks of a held claim (another server process may
#: have made a task ready without waking this one).
CLAIM_RECHECK_INTERVAL = 0.5
#: Claims held open at once per server process; more answer at once, with
#: a `retry_after`, so long polls never take every request thread
#: (`banyan server` sets it to half its threads).
CLAIM_MAX_WAITERS = 8
#: Claims a second that the workers turned away from waiting should add up
#: to, per server process: their `retry_after` grows with the number of
#: active workers (500 workers: about 10 s).
CLAIM_RETRY_RATE = 50
#: Seconds a claim may wait for a request thread (`banyan server`'s queue
#: of workers' requests) and still claim: one that waited longer is answered
#: with a `retry_after` and no task, since its worker (banyan-worker gives a
#: claim 15 s beyond its long poll) may have given it up.
CLAIM_MAX_QUEUED = 5
#: Most tasks one claim may ask for.
CLAIM_MAX_TASKS = 1000

# Waits on tasks to finish (banyan.server.waits, POST /tasks/wait).
#: Longest a wait is held open, in seconds.
WAIT_MAX_TIMEOUT = 30
#: Seconds between re-checks of a held wait (another server process may have
#: finished its tasks without waking this one); on the embedded store, which
#: no other process writes, the first one, each next one twice as long.
WAIT_RECHECK_INTERVAL = 0.5
#: Waits held open at once per server process; more answer at once.
WAIT_MAX_WAITERS = 4
#: Most task ids one wait may name.
WAIT_MAX_IDS = 10000

# The dashboard's long poll (banyan.server.changes, GET /changes).
#: Longest a poll is held open, in seconds.
CHANGES_MAX_TIMEOUT = 25
#: Seconds between looks at the store while a poll is held.
CHANGES_RECHECK_INTERVAL = 0.5
#: Polls held open at once per server process; more answer at once.
CHANGES_MAX_WAITERS = 4
