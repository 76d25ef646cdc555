"""Waiting for tasks to finish (`banyan wait`, `banyan submit --wait`, `Client.wait`).

The set of tasks is fixed when the wait starts (ids, or a `where` filter
evaluated then). Each round is one `POST /tasks/wait` on the tasks not yet
finished: the server holds it until they have all finished or `interval`
seconds passed (so progress is drawn that often; without `on_progress`, as
long as the server holds it), and answers the moment the last one ends,
with how each finished task ended (`outcomes`: no read of the tasks
before or after it; the first answer also names ids of no task; with
`on_progress`, that first round is a look that holds nothing, so the
progress drawn first is a true one and a server that cannot be reached is
said before anything is drawn). A
server too busy to hold it (or one without that endpoint) is polled instead,
with a small projection, every 0.2 s growing to `interval`; a task's details
are then fetched once, when it finishes.
"""

import time
from dataclasses import dataclass, field

from banyan.errors import BanyanError
from banyan.protocol import FINISHED, HELD, Outcome, TaskState

__all__ = ["FINISHED", "MissingTasks", "Progress", "WaitResult", "wait_for", "succeeded"]

#: What is read of a finished task: enough to say how it ended.
OUTCOME_PROJECTION = {"name": 1, "state": 1, "exit_status": 1, "current_history": 1, "cancelled_by": 1}
_CHUNK = 200
#: The most ids one held wait names (the server's WAIT_MAX_IDS).
_WAIT_CHUNK = 10000
#: A held round's length when no progress is drawn (the server caps it).
_HELD_ROUND = 30.0


class MissingTasks(LookupError):
    """Some of the ids to wait for name no task (or none the caller may see)."""

    def __init__(self, task_ids):
        self.task_ids = list(task_ids)
        super().__init__("no such task (or not yours): %s" % ", ".join(self.task_ids))


@dataclass
class Progress:
    total: int
    finished: int
    succeeded: int
    failed: int
    running: int
    elapsed: float


@dataclass
class WaitResult:
    #: every task waited for, as last read: {id: {name, state, exit_status, current_history}}
    tasks: dict = field(default_factory=dict)
    timed_out: bool = False

    @property
    def failed(self):
        """Finished tasks that did not succeed (failed, timed out, abandoned or cancelled)."""
        return [doc for doc in self.tasks.values() if doc.get("state") in FINISHED and not succeeded(doc)]

    @property
    def unfinished(self):
        return [doc for doc in self.tasks.values() if doc.get("state") not in FINISHED]

    @property
    def ok(self):
        return not self.timed_out and not self.failed and not self.unfinished


def succeeded(doc):
    return doc.get("state") == TaskState.TERMINATED and doc.get("exit_status") == Outcome.SUCCESS


def wait_for(
    client,
    task_ids=None,
    where=None,
    interval=1.0,
    timeout=None,
    on_progress=None,
    sleep=time.sleep,
    clock=time.monotonic,
):
    """Wait until every task (of `task_ids`, or matching `where`) has
    finished, or `timeout` seconds passed. `on_progress(Progress)` is called
    after every round. Raises MissingTasks for ids that name no task."""
    start = clock()
    unread = False  # True until an answer said how each of `task_ids` stands
    if task_ids is not None:
        task_ids = list(dict.fromkeys(task_ids))
        if len(task_ids) <= _WAIT_CHUNK:
            # The first held round's answer says it (`outcomes`), without a read of its own.
            tasks, unread = {task_id: {"_id": task_id, "state": None} for task_id in task_ids}, True
        else:
            tasks = _read(client, task_ids)
    else:
        tasks = {doc["_id"]: doc for doc in client.iter_tasks(where or {}, OUTCOME_PROJECTION, max_results=10000)}
    result = WaitResult(tasks)
    running = {task_id: doc["state"] for task_id, doc in tasks.items() if doc.get("state") not in FINISHED}
    delay = min(interval, 0.2)  # polled: short tasks are seen soon; then every `interval`
    held = True  # the server holds waits (False once it says it has no such endpoint)
    outcomes = True  # its answers say how tasks ended (False from a server that predates it)
    while True:
        if on_progress is not None and not unread:
            on_progress(_progress(result, running, clock() - start))
        if not running and task_ids is None and (where or {}).get("job"):
            # Tasks of the job added while it ran (`submit --child`): all of
            # them exist once every task that could add one has ended.
            for doc in client.iter_tasks(dict(where, _id={"$nin": list(tasks)}), OUTCOME_PROJECTION, max_results=10000):
                tasks[doc["_id"]] = doc
                if doc.get("state") not in FINISHED:
                    running[doc["_id"]] = doc["state"]
        if not running:
            return result
        if timeout is not None and clock() - start >= timeout and not unread:
            result.timed_out = True
            _read_unfinished(client, result)
            return result
        still = finished = None
        if held:
            asked = list(running)[:_WAIT_CHUNK]
            # Without progress to draw, a round may last as long as the server holds it.
            seconds = interval if on_progress is not None else _HELD_ROUND
            if unread and on_progress is not None:
                seconds = 0  # a first look, for the progress drawn before the wait
            if timeout is not None:
                seconds = max(0.0, min(seconds, timeout - (clock() - start)))
            reply = _held_round(client, asked, seconds, outcomes)
            if reply is None:
                held = False
            else:
                still = reply["unfinished"]
                finished = reply.get("finished")
                outcomes = finished is not None
                if unread and outcomes:
                    if reply.get("missing"):
                        raise MissingTasks(reply["missing"])
                    unread = False
                if not reply.get("waited"):  # too busy to hold it: pace the rounds ourselves
                    sleep(delay)
                    delay = min(interval, delay * 2)
        if unread:
            # No answer said how they stand (a server that holds no waits,
            # or knows no `outcomes`): read them, as that answer would have.
            for task_id, doc in _read(client, task_ids).items():
                tasks[task_id].update(doc)
                if doc.get("state") in FINISHED:
                    running.pop(task_id, None)
                else:
                    running[task_id] = doc["state"]
            unread = False
            if still is None:
                continue
        if still is None:
            sleep(delay)
            delay = min(interval, delay * 2)
            asked = list(running)
            still = _unfinished_states(client, asked, where if task_ids is None else None)
        done = [task_id for task_id in asked if task_id not in still]
        if finished is not None:
            fetched = finished
        else:
            fetched = client.tasks_by_id(done, OUTCOME_PROJECTION) if done else {}
        for task_id in done:
            # A task the filter no longer matches (`{"state": "available"}`
            # once it is claimed) may still run: finished means its state says so.
            doc = fetched.get(task_id)
            if doc is None or doc.get("state") in FINISHED:
                running.pop(task_id, None)
                if doc is not None:
                    tasks[task_id] = doc
            else:
                running[task_id] = tasks[task_id]["state"] = doc["state"]
        for task_id, state in still.items():
            if task_id in running:
                running[task_id] = tasks[task_id]["state"] = state


def _read(client, task_ids):
    """{id: task} of each of `task_ids`, in their order; MissingTasks for
    ids that name no task."""
    found = client.tasks_by_id(task_ids, OUTCOME_PROJECTION)
    missing = [task_id for task_id in task_ids if task_id not in found]
    if missing:
        raise MissingTasks(missing)
    return {task_id: found[task_id] for task_id in task_ids}


def _read_unfinished(client, result):
    """Unfinished tasks known only by their state (the held rounds' answers
    say no more of them), read in full for the caller."""
    bare = [task_id for task_id, doc in result.tasks.items() if doc.get("state") not in FINISHED and "name" not in doc]
    if bare:
        for task_id, doc in client.tasks_by_id(bare, OUTCOME_PROJECTION).items():
            result.tasks[task_id].update(doc)


def _held_round(client, task_ids, seconds, outcomes):
    """The server's answer to a held wait on `task_ids`, with the finished
    ones' outcomes if asked and the server knows how; None from a server
    without `POST /tasks/wait`."""
    try:
        return client.wait_unfinished(task_ids, seconds, outcomes=outcomes)
    except BanyanError as exc:
        if exc.status in (404, 405):
            return None
        if outcomes and exc.status in (400, 422) and "outcomes" in (exc.issues or {}):
            return _held_round(client, task_ids, seconds, False)
        raise


def _unfinished_states(client, task_ids, where):
    """{id: state} of those of `task_ids` that have not finished."""
    unfinished = {"state": {"$nin": [s.value for s in FINISHED]}}
    states = {}
    if where is not None and len(task_ids) > _CHUNK:
        # One paged query over the filter beats many `$in` chunks.
        wanted = set(task_ids)
        query = {"$and": [where, unfinished]} if where else unfinished
        for doc in client.iter_tasks(query, {"state": 1}, max_results=10000):
            if doc["_id"] in wanted:
                states[doc["_id"]] = doc["state"]
        return states
    for begin in range(0, len(task_ids), _CHUNK):
        part = task_ids[begin : begin + _CHUNK]
        query = dict(unfinished, _id={"$in": part})
        for doc in client.iter_tasks(query, {"state": 1}, max_results=len(part)):
            states[doc["_id"]] = doc["state"]
    return states


def _progress(result, running, elapsed):
    finished = [doc for doc in result.tasks.values() if doc.get("state") in FINISHED]
    ok = sum(1 for doc in finished if succeeded(doc))
    return Progress(
        total=len(result.tasks),
        finished=len(finished),
        succeeded=ok,
        failed=len(finished) - ok,
        running=sum(1 for state in running.values() if state in HELD),
        elapsed=elapsed,
    )
