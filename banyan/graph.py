"""Task graphs: what `banyan submit` sends, and how it makes them run.

A `TaskGraph` is a set of tasks to create, each under a key (its name in a
graph file), with edges parent -> continuation. `task_document` turns the
fields people write (`cores`, `memory: 2 GiB`, `time_limit: 1h`, `after`)
into an API document; `load_graph` reads a YAML graph file::

    defaults:            # optional: applied to every task
      cores: 1
    tasks:
      - name: fetch
        command: curl -sO https://example.org/data.csv
      - name: clean
        command: [python3, clean.py, data.csv]
        memory: 2 GiB
        after: [fetch]         # or, on `fetch`: continuations: [clean]
      - name: done             # no command: a barrier
        after: [clean]
      - name: summary          # runs once clean ended, whatever its outcome
        after_any: [clean]
      - name: alert            # runs only if clean did not succeed
        after_failure: [clean]

(`tasks` may also be a mapping from name to fields.)

`submit_graph` makes one job for the submission and creates the tasks so
that they run in dependency order, and only once the whole graph is
accepted. Each task names its parents (`after`, `after_any`,
`after_failure`: the server links it to them), so parents are created
first: the roots, then each level below, one bulk POST per level, all
`inactive` (a bulk POST is checked against the database, not against
itself). Then every task is made `available`, leaves first, so that no
root runs before all that follows it is queued. A graph without edges (one
task, an array) is one POST of `available` tasks. If anything is refused
on the way, the tasks already created are cancelled, so nothing of a
half-submitted graph runs.
"""

import os
import re

from banyan.errors import BanyanError, describe_result
from banyan.protocol import AFTER_FIELDS, FINISHED, TaskState, edge_satisfied
from banyan.units import parse_duration, parse_size

__all__ = ["GraphError", "TaskGraph", "task_document", "load_graph", "graph_from_data", "submit_graph", "check_task_id"]

#: Fields of a task as written in a graph file (and built from `submit` flags).
FIELDS = (
    "name",
    "command",
    "cores",
    "memory",
    "gpus",
    "retries",
    "max_lost",
    "retry_memory_factor",
    "priority",
    "time_limit",
    "environment",
    "working_directory",
    "max_shutdown_time",
    "estimated_runtime",
    "after",
    "after_any",
    "after_failure",
    "continuations",
)
#: Graph-file fields naming parents (`AFTER_FIELDS`), by the kind of edge each makes.
KIND_FIELDS = {kind: field for field, kind in AFTER_FIELDS.items()}
ALIASES = {"max_retries": "retries", "env": "environment", "cwd": "working_directory"}
_TASK_ID_RE = re.compile(r"^[0-9a-fA-F]{24}$")


class GraphError(Exception):
    """A graph (file or flags) that cannot be submitted; the message says why."""


def check_task_id(value):
    """`value` if it looks like a task id, else GraphError."""
    if not isinstance(value, str) or not _TASK_ID_RE.match(value):
        raise GraphError("'%s' is not a task id (24 hexadecimal characters)" % (value,))
    return value.lower()


def _number(value, what, integer=False):
    if isinstance(value, bool):
        raise GraphError("%s must be a number, not %r" % (what, value))
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise GraphError("%s must be %s, not %r" % (what, "a whole number" if integer else "a number", value)) from None
    if integer and isinstance(value, float) and not value.is_integer():
        raise GraphError("%s must be a whole number, not %r" % (what, value))
    if number != number or number in (float("inf"), float("-inf")):
        raise GraphError("%s must be a finite number, not %r" % (what, value))
    return number


def _non_negative(value, what, integer=False):
    number = _number(value, what, integer)
    if number < 0:
        raise GraphError("%s must be >= 0, not %r" % (what, value))
    return number


def _duration(value, what):
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise GraphError("%s: %s" % (what, exc)) from None


#: `banyan submit` flags of the fields, for messages about them.
FLAGS = {"environment": "--env", "working_directory": "--cwd"}


def task_document(fields, where=None):
    """The API document for one task's `fields` (graph-file names; `after`
    and `continuations` are left to the graph). GraphError names any bad
    field: as `where: 'field'`, or as its `banyan submit` flag when `where`
    is None."""
    doc: dict = {}
    resources: dict = {}
    for key, value in fields.items():
        key = ALIASES.get(key, key)
        if where is None:
            what = FLAGS.get(key) or "--" + key.replace("_", "-")
        else:
            what = "%s: '%s'" % (where, key)
        if value is None or key in AFTER_FIELDS or key == "continuations":
            continue
        if key == "name":
            doc["name"] = str(value)
        elif key == "command":
            if isinstance(value, (list, tuple)):
                if not value:
                    raise GraphError("%s is an empty list" % what)
                doc["command"] = [str(v) for v in value]
            elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                if not str(value).strip():
                    raise GraphError("%s is empty" % what)
                doc["command"] = str(value)
            else:
                raise GraphError("%s must be a string (run by /bin/sh -c) or a list of arguments" % what)
        elif key == "cores":
            resources["cores"] = _non_negative(value, what)
            if resources["cores"].is_integer():
                resources["cores"] = int(resources["cores"])
        elif key == "memory":
            try:
                resources["memory"] = parse_size(value)
            except ValueError as exc:
                raise GraphError("%s: %s" % (what, exc)) from None
        elif key == "gpus":
            resources["gpus"] = _non_negative(value, what, integer=True)
        elif key == "retries":
            doc["max_retries"] = _non_negative(value, what, integer=True)
        elif key == "max_lost":
            doc["max_lost"] = _non_negative(value, what, integer=True)
        elif key == "retry_memory_factor":
            doc["retry_memory_factor"] = _number(value, what)
            if not 1 <= doc["retry_memory_factor"] <= 1024:
                raise GraphError("%s must be a number from 1 to 1024, not %r" % (what, value))
        elif key == "priority":
            doc["priority"] = _number(value, what, integer=True)
        elif key in ("time_limit", "max_shutdown_time", "estimated_runtime"):
            doc[key] = _duration(value, what)
            if key == "time_limit" and doc[key] == 0:
                raise GraphError("%s must be more than 0 seconds, not %r (leave it out for no limit)" % (what, value))
        elif key == "environment":
            if not isinstance(value, dict):
                raise GraphError("%s must be a mapping of NAME: value" % what)
            doc["environment"] = {str(k): "" if v is None else str(v) for k, v in value.items()}
        elif key == "working_directory":
            doc["working_directory"] = str(value)
        else:
            raise GraphError("%s: unknown field '%s' (known: %s)" % (where or "task", key, ", ".join(FIELDS)))
    if resources:
        doc["requested_resources"] = resources
    return doc


class TaskGraph:
    """Tasks to create, by key, and which runs after which."""

    def __init__(self):
        self.docs = {}  # key -> API document
        self.children = {}  # key -> [keys of its continuations]
        self.kinds = {}  # (parent key, child key) -> "success" | "any" | "failure"
        self._refs = []  # (task, "after" | "after_any" | ... | "continuations", name it refers to)

    def __len__(self):
        return len(self.docs)

    def __iter__(self):
        return iter(self.docs)

    def add(self, key, doc, after=(), continuations=(), after_any=(), after_failure=()):
        """Add a task; `after`, `after_any`, `after_failure` and
        `continuations` are keys of other tasks (which may be added later;
        `check` finds the missing ones)."""
        if key in self.docs:
            raise GraphError("two tasks are named '%s'; names in a graph must be unique" % key)
        self.docs[key] = dict(doc)
        self.children.setdefault(key, [])
        for child in continuations:
            self._refs.append((key, "continuations", child))
            self.link(key, child)
        for field, parents in (("after", after), ("after_any", after_any), ("after_failure", after_failure)):
            for parent in parents:
                self._refs.append((key, field, parent))
                self.link(parent, key, AFTER_FIELDS[field])

    def link(self, parent, child, kind="success"):
        """Make `child` run after `parent` ends as `kind` says."""
        if self.kinds.get((parent, child), kind) != kind:
            raise GraphError(
                "task '%s' runs after '%s' in two ways (%s and %s)"
                % (child, parent, KIND_FIELDS[self.kinds[(parent, child)]], KIND_FIELDS[kind])
            )
        self.kinds[(parent, child)] = kind
        children = self.children.setdefault(parent, [])
        if child not in children:
            children.append(child)

    def parents(self, key):
        """{kind field: [parent keys]} of the task `key`."""
        found: dict[str, list] = {}
        for (parent, child), kind in self.kinds.items():
            if child == key:
                found.setdefault(KIND_FIELDS[kind], []).append(parent)
        return found

    def check(self):
        """GraphError for a name that names no task, or a cycle."""
        for key, field, name in self._refs:
            if name not in self.docs:
                raise GraphError("task '%s': '%s' names '%s', which is not a task of the graph" % (key, field, name))
        for parent, children in self.children.items():
            for key in [parent] + children:
                if key not in self.docs:
                    raise GraphError("'%s' is not a task of the graph" % key)
        cycle = self._cycle()
        if cycle:
            raise GraphError("the graph has a cycle: %s" % " -> ".join(cycle))

    def _cycle(self):
        state: dict[str, int] = {}  # key -> 1 visiting, 2 done
        for start in self.docs:
            if state.get(start):
                continue
            path, stack = [], [(start, iter(self.children[start]))]
            state[start] = 1
            path.append(start)
            while stack:
                node, children = stack[-1]
                for child in children:
                    if state.get(child) == 1:
                        return path[path.index(child) :] + [child]
                    if not state.get(child):
                        state[child] = 1
                        path.append(child)
                        stack.append((child, iter(self.children[child])))
                        break
                else:
                    state[node] = 2
                    path.pop()
                    stack.pop()
        return None

    def roots(self):
        """Keys of the tasks that run after no other task of the graph."""
        has_parent = {child for children in self.children.values() for child in children}
        return [key for key in self.docs if key not in has_parent]

    def creation_levels(self):
        """The tasks in the order they can be created: lists of keys, each
        task after all its continuations; the roots form the last list."""
        roots = set(self.roots())
        height: dict[str, int] = {}
        for key in self.docs:
            stack = [key]
            while stack:
                node = stack[-1]
                pending = [c for c in self.children[node] if c not in height]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                height[node] = 1 + max((height[c] for c in self.children[node]), default=-1)
        levels: dict[int, list] = {}
        for key in self.docs:
            if key not in roots:
                levels.setdefault(height[key], []).append(key)
        ordered = [levels[h] for h in sorted(levels)]
        ordered.append([key for key in self.docs if key in roots])
        return ordered


def load_graph(path, defaults=None):
    """A `TaskGraph` from a YAML graph file (see the module docstring).
    `defaults` (fields) apply under the file's own `defaults`."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise GraphError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except yaml.YAMLError as exc:
        raise GraphError("%s is not valid YAML: %s" % (path, " ".join(str(exc).split()))) from None
    except UnicodeDecodeError:
        raise GraphError("%s is not UTF-8 text" % path) from None
    return graph_from_data(data, source=os.path.basename(path), defaults=defaults)


def graph_from_data(data, source="graph", defaults=None):
    file_defaults: dict = {}
    if isinstance(data, dict):
        unknown = set(data) - {"tasks", "defaults"}
        if unknown:
            raise GraphError(
                "%s: unknown top-level key(s) %s (expected 'tasks' and optionally 'defaults')"
                % (source, ", ".join(sorted(map(str, unknown))))
            )
        file_defaults = data.get("defaults") or {}
        if not isinstance(file_defaults, dict):
            raise GraphError("%s: 'defaults' must be a mapping of fields" % source)
        for key in ("name", "continuations") + tuple(AFTER_FIELDS):
            if key in file_defaults:
                raise GraphError("%s: '%s' cannot be a default" % (source, key))
        entries = data.get("tasks")
    else:
        entries = data
    if isinstance(entries, dict):
        items = []
        for name, fields in entries.items():
            if fields is None:
                fields = {}
            if not isinstance(fields, dict):
                raise GraphError("%s: task '%s' must be a mapping of fields" % (source, name))
            if "name" in fields and str(fields["name"]) != str(name):
                raise GraphError("%s: task '%s' has another name '%s'" % (source, name, fields["name"]))
            items.append(dict(fields, name=str(name)))
    elif isinstance(entries, list):
        items = entries
    else:
        raise GraphError("%s: expected a list of tasks (or 'tasks:' with a list or mapping)" % source)
    if not items:
        raise GraphError("%s: the graph has no tasks" % source)
    graph = TaskGraph()
    for i, fields in enumerate(items, 1):
        if not isinstance(fields, dict):
            raise GraphError("%s: task %d must be a mapping of fields" % (source, i))
        if not fields.get("name"):
            raise GraphError("%s: task %d has no 'name' (names say which task runs after which)" % (source, i))
        name = str(fields["name"])
        where = "%s: task '%s'" % (source, name)
        merged = dict(defaults or {})
        merged.update(file_defaults)
        merged.update(fields)
        doc = task_document(merged, where)
        parents = {field: _names(fields.get(field), where, field) for field in AFTER_FIELDS}
        continuations = _names(fields.get("continuations"), where, "continuations")
        graph.add(name, doc, continuations=continuations, **parents)
    try:
        graph.check()
    except GraphError as exc:
        raise GraphError("%s: %s" % (source, exc)) from None
    return graph


def _names(value, where, key):
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    raise GraphError("%s: '%s' must be a task name or a list of names" % (where, key))


# -- submission ----------------------------------------------------------------


def check_parents(client, parents):
    """GraphError unless every task of `parents` ({kind field: [ids]})
    exists and may still end the way the edge needs (a task after a failed
    one would never run)."""
    ids = [task_id for group in parents.values() for task_id in group]
    found = client.tasks_by_id(ids, {"state": 1, "exit_status": 1, "name": 1})
    for field, group in parents.items():
        flag = "--" + field.replace("_", "-")
        for task_id in group:
            doc = found.get(task_id)
            if doc is None:
                raise GraphError("%s %s: no such task (or not yours)" % (flag, task_id))
            label = "task %s%s" % (task_id, " (%s)" % doc["name"] if doc.get("name") else "")
            state, status = doc.get("state"), doc.get("exit_status")
            if field == "after" and state == TaskState.PENDING_CANCELLATION:
                raise GraphError("%s: %s is being cancelled, so what runs after it would never run" % (flag, label))
            if state in FINISHED and not edge_satisfied(AFTER_FIELDS[field], doc):
                if field == "after_failure":
                    raise GraphError("%s: %s succeeded, so what runs after its failure would never run" % (flag, label))
                raise GraphError(
                    "%s: %s ended with %s, so what runs after it would never run" % (flag, label, status or state)
                )


def submit_graph(
    client, graph, after=(), after_any=(), after_failure=(), job=None, name=None, array_limit=None, added_by=None
):
    """Create the tasks of `graph` so that they run (see the module
    docstring), in job `job` (else a new job named `name`, running at most
    `array_limit` tasks at once); returns {key: task id} in the graph's
    order. The roots also run after the existing tasks `after` (their
    success), `after_any` (their end) and `after_failure` (their failure).
    With `added_by` (a running task's id), they are that task's children,
    in its job (see `banyan submit --child`): created ready to run, each
    level after the one it runs after. Raises GraphError or BanyanError,
    with nothing left to run."""
    graph.check()
    external = {}
    for field, group in (("after", after), ("after_any", after_any), ("after_failure", after_failure)):
        if group:
            external[field] = [check_task_id(task_id) for task_id in dict.fromkeys(group)]
    if external:
        check_parents(client, external)
    if job is None and added_by is None:
        job = client.create_job(
            name or next((doc.get("name") for doc in graph.docs.values()), None), array_limit=array_limit
        )
    roots = set(graph.roots())
    levels = list(reversed(graph.creation_levels()))  # roots first, then each level below
    # Children are made `available` at once (an edge to a task not yet
    # created is made when it is, and waits as any other): an attempt
    # token adds tasks and changes none.
    has_edges = any(graph.children.values()) and added_by is None
    ids: dict[str, str] = {}
    created: list[str] = []
    try:
        for level in levels:
            docs = []
            for key in level:
                doc = dict(graph.docs[key], state=(TaskState.INACTIVE if has_edges else TaskState.AVAILABLE).value)
                if added_by is None:
                    doc["job"] = job
                else:
                    doc["added_by"] = added_by
                for field, parents in graph.parents(key).items():
                    doc[field] = [ids[parent] for parent in parents]
                if key in roots:
                    for field, group in external.items():
                        doc[field] = list(dict.fromkeys(doc.get(field, []) + group))
                docs.append(doc)
            new = client.create_tasks(docs) if docs else []
            ids.update(zip(level, new))
            created.extend(new)
        if has_edges:
            _make_available(client, [ids[key] for level in reversed(levels) for key in level])
    except BaseException:
        _cancel_quietly(client, created)
        raise
    return {key: ids[key] for key in graph}


def _make_available(client, task_ids):
    """Make inactive tasks available. One that is no longer inactive was
    released by its parents meanwhile (fine) or cancelled because one of them
    failed (GraphError)."""
    results = client.set_states(task_ids, TaskState.AVAILABLE.value)
    refused = [task_id for task_id, result in zip(task_ids, results) if describe_result(result)]
    if not refused:
        return
    states = client.tasks_by_id(refused, {"state": 1, "cancelled_by": 1})
    for task_id, result in zip(task_ids, results):
        if task_id not in refused:
            continue
        state = (states.get(task_id) or {}).get("state")
        if state == TaskState.CANCELLED and not states[task_id].get("cancelled_by"):
            raise GraphError("task %s was cancelled before it could start" % task_id)
        if state in (None, TaskState.INACTIVE):
            raise BanyanError(422, "task %s could not be made available: %s" % (task_id, describe_result(result)))


def _cancel_quietly(client, task_ids):
    if not task_ids:
        return
    try:
        client.set_states(task_ids, TaskState.CANCELLED.value)
    except Exception:
        pass
