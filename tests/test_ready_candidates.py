"""Claims that share one sorted read of the ready tasks per server process
(banyan/server/ready_candidates.py, used where the store sorts in its own
process: FerretDB 1.x). Here it is turned on for any store: two `TaskQueue`s
over one database stand for two server processes, each with its own read."""

import threading
import uuid
from datetime import timedelta

from bson import ObjectId

from banyan.server.states import TaskQueue, utcnow

EVERYTHING = {"cores": 64, "memory": 1 << 40, "gpus": 0}
NO_CORE = dict(EVERYTHING, cores=0)


class ManualClock:
    """The clock of a queue's shared read, moved by the test rather than by
    time: `within_interval` and `past_interval` move it to just before and
    just after the end of the interval of the last read."""

    def __init__(self, queue):
        self.shared = queue._shared
        self.now = 1000.0
        self.shared.clock = lambda: self.now

    def within_interval(self):
        self.now = self.shared.started() + self.shared.interval() - 0.01

    def past_interval(self):
        self.now = self.shared.started() + self.shared.interval() + 0.01


def count_calls(monkeypatch, obj, name):
    """Wrap `obj.name` so that its calls are counted; returns the count's getter."""
    calls = []
    method = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return method(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return lambda: len(calls)


def queue_pair(db):
    return TaskQueue(db, share_claim_reads=True), TaskQueue(db, share_claim_reads=True)


def seed(queue, bodies, age=0):
    """Ready tasks, stored as `POST /tasks` would, made ready through `queue`."""
    now = utcnow().replace(microsecond=0) - timedelta(seconds=age)
    docs = [
        dict(
            {
                "command": "x",
                "state": "available",
                "priority": 0,
                "max_retries": 0,
                "continuations": [],
                "requested_resources": {"cores": 1, "memory": 0, "gpus": 0},
                "_created": now,
                "_updated": now,
                "_etag": uuid.uuid4().hex,
            },
            **body,
        )
        for body in bodies
    ]
    for doc in docs:
        doc["requested_resources"] = dict({"cores": 1, "memory": 0, "gpus": 0}, **doc["requested_resources"])
    queue.prepare_new(docs)
    queue.tasks.insert_many(docs)
    queue.after_insert(docs)
    return [d["_id"] for d in docs]


def claim_all(queue, free=None):
    got = []
    while True:
        doc = queue.claim_next(ObjectId(), free or EVERYTHING)
        if doc is None:
            return got
        got.append(doc["_id"])


def test_shared_read_claims_in_priority_then_age_then_id_order(db):
    one, _ = queue_pair(db)
    old = seed(one, [{"priority": 1}, {"priority": 1}], age=60)
    new = seed(one, [{"priority": 5}, {"priority": 1}])
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == new[0]
    # made ready through this queue after its read: in its place at once
    (urgent,) = seed(one, [{"priority": 9}])
    (later,) = seed(one, [{"priority": 0}], age=120)
    assert claim_all(one) == [urgent, old[0], old[1], new[1], later]
    assert db.tasks.count_documents({"state": "running"}) == 6


def test_a_task_too_big_is_passed_over_for_a_smaller_one(db):
    one, _ = queue_pair(db)
    big, small = seed(one, [{"priority": 5, "requested_resources": {"cores": 8}}, {"priority": 1}])
    assert one.claim_next(ObjectId(), {"cores": 2, "memory": 0, "gpus": 0})["_id"] == small
    assert one.claim_next(ObjectId(), {"cores": 2, "memory": 0, "gpus": 0}) is None
    assert one.claim_next(ObjectId(), {"cores": 8, "memory": 0, "gpus": 0})["_id"] == big


def test_a_change_through_this_queue_reorders_its_read(db):
    one, _ = queue_pair(db)
    first, second, third = seed(one, [{}, {}, {}])
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == first  # the read is made
    db.tasks.update_one({"_id": third}, {"$set": {"priority": 3}})
    one.after_update({"priority": 3}, db.tasks.find_one({"_id": third}))
    assert claim_all(one) == [third, second]


def test_tasks_claimed_or_made_ready_by_another_process_are_seen(db):
    one, two = queue_pair(db)
    clock = ManualClock(one)
    ids = seed(one, [{} for _ in range(4)])
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == ids[0]  # both reads hold ids[1:]
    assert two.claim_next(ObjectId(), EVERYTHING)["_id"] == ids[1]
    assert claim_all(two) == ids[2:]
    # `one` still holds ids[1:] in its read: each fails its claim's precondition
    assert one.claim_next(ObjectId(), EVERYTHING) is None
    (fresh,) = seed(two, [{}])  # not in `one`'s read: found once that read is past its interval
    assert one.claim_next(ObjectId(), EVERYTHING) is None
    clock.past_interval()
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == fresh
    for doc in db.tasks.find({}):
        assert doc["state"] == "running" and len(doc["history"]) == 1


def test_nothing_in_a_fresh_complete_read_is_nothing_without_reading_again(db):
    one, two = queue_pair(db)
    clock = ManualClock(one)
    first, second = seed(one, [{}, {}])
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == first
    assert one._shared.reads == 1
    # a worker whose cores are all taken asks for tasks needing none, again and again
    for _ in range(5):
        assert one.claim_next(ObjectId(), NO_CORE) is None
    assert one._shared.reads == 1
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == second
    assert one.claim_next(ObjectId(), EVERYTHING) is None
    assert one._shared.reads == 1
    # made ready through this process: claimed at once, from the same read
    (mine,) = seed(one, [{"requested_resources": {"cores": 0}}])
    assert one.claim_next(ObjectId(), NO_CORE)["_id"] == mine
    # made ready through another: not seen before the read's interval is over ...
    (theirs,) = seed(two, [{"requested_resources": {"cores": 0}}])
    clock.within_interval()
    assert one.claim_next(ObjectId(), NO_CORE) is None
    assert one._shared.reads == 1
    # ... and claimed at the first claim after it, by a new read
    clock.past_interval()
    assert one.claim_next(ObjectId(), NO_CORE)["_id"] == theirs
    assert one._shared.reads == 2
    assert db.tasks.count_documents({"state": "running"}) == 4


def test_nothing_within_a_claim_own_read_is_nothing_until_the_interval_is_over(db, monkeypatch):
    """A read too short to hold every ready task: a claim for what none of
    it fits reads by itself; claims for no more than it asked for take
    that read's "nothing" within the same interval."""
    one, two = queue_pair(db)
    clock = ManualClock(one)
    one._shared.size = 2
    own_reads = count_calls(monkeypatch, one, "_read_candidates")
    seed(one, [{} for _ in range(3)])  # a core each
    for _ in range(4):
        assert one.claim_next(ObjectId(), NO_CORE) is None
    assert (one._shared.reads, own_reads()) == (1, 1)
    (mine,) = seed(one, [{"requested_resources": {"cores": 0}}])  # through this process: no longer "nothing"
    assert one.claim_next(ObjectId(), NO_CORE)["_id"] == mine
    assert one.claim_next(ObjectId(), NO_CORE) is None
    reads = (one._shared.reads, own_reads())
    (theirs,) = seed(two, [{"requested_resources": {"cores": 0}}])
    clock.within_interval()
    assert one.claim_next(ObjectId(), NO_CORE) is None
    assert (one._shared.reads, own_reads()) == reads
    clock.past_interval()
    assert one.claim_next(ObjectId(), NO_CORE)["_id"] == theirs
    assert db.tasks.count_documents({"state": "available"}) == 3


def test_claims_go_on_from_the_last_read_while_the_next_is_made(db):
    one, _ = queue_pair(db)
    clock = ManualClock(one)
    ids = seed(one, [{} for _ in range(4)])
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == ids[0]
    read, reading, finish = one._shared._read, threading.Event(), threading.Event()

    def slow_read(limit):
        docs = read(limit)
        reading.set()
        assert finish.wait(30)
        return docs

    one._shared._read = slow_read
    clock.past_interval()
    got = {}
    reader = threading.Thread(target=lambda: got.update(doc=one.claim_next(ObjectId(), EVERYTHING)))
    reader.start()
    assert reading.wait(30)
    # a read (holding ids[1:]) is under way: this claim takes from the last one ...
    assert one.claim_next(ObjectId(), EVERYTHING)["_id"] == ids[1]
    # ... and a task made ready meanwhile joins the new read in its place
    (urgent,) = seed(one, [{"priority": 9}])
    finish.set()
    reader.join()
    assert got["doc"]["_id"] == urgent
    assert claim_all(one) == ids[2:]
    assert one._shared.reads == 2
    for doc in db.tasks.find({}):
        assert doc["state"] == "running" and len(doc["history"]) == 1


def test_concurrent_claimers_of_two_processes_take_each_task_once(db):
    one, two = queue_pair(db)
    n = 200
    seed(one, [{"priority": i % 3} for i in range(n)])
    claimed, errors = [], []

    def claimer(queue):
        try:
            while True:
                got = queue.claim_batch(ObjectId(), {"cores": 8, "memory": 0, "gpus": 0}, 8)
                if not got:
                    return
                claimed.extend(doc["_id"] for doc in got)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=claimer, args=(q,)) for q in (one, two) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(claimed) == len(set(claimed)) == n
    docs = list(db.tasks.find({}, {"state": 1, "history": 1}))
    assert len(docs) == n and all(d["state"] == "running" and len(d["history"]) == 1 for d in docs)
    # the claims of one process shared their reads
    assert one._shared.reads + two._shared.reads < n / 4
