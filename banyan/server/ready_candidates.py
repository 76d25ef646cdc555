"""One sorted read of the ready tasks, shared by the claims of a server process.

A claim picks its tasks from the ready ones in the claim order (priority,
then age, then id) and takes each with one conditional update whose filter
is the ready query again (`TaskQueue._claim_one`). On MongoDB and on the
embedded store the sorted read is answered from an index, a few documents
at a time. FerretDB 1.x hands PostgreSQL only the top-level equalities of a
filter and makes every sort and limit in its own process: each claim's read
fetched and sorted every ready task (1,500 in the three-server test, a claim
every few tens of milliseconds), and that alone saturated FerretDB.

So on such a store (`shares_claim_reads`) the claims of one process share
the read: `ReadyCandidates` keeps the first `size` ready tasks in the claim
order and hands each candidate to one claimer of the process at a time
(`take`), so concurrent claimers of one server never chase the same task.
Nothing here decides who gets a task: the claim's conditional update does,
in whatever process; a candidate another process took, held or changed
meanwhile just fails that update and is dropped (`drop`), one a claim could
not use is given back (`give_back`). Tasks made ready through this process
are added at once (`add`), a change of a queued task through it forgets the
read (`forget`).

A read serves claims for its `interval()` (`seconds`, longer on a store so
busy that a read takes a good part of that, SHARED_READ_MAX_SECONDS at
most); the claim that finds it older makes the next one, outside the lock,
while the others go on from the last. "Nothing to claim" is the answer of
a read that started at most `interval()` before the claim began, with what
this process made ready since: a worker whose cores are all taken asks for
tasks needing none after every claim, and each such question read every
ready task again (0.3 s or more on FerretDB) before. So a task made ready
through another server is seen by this process's claims within
`interval()`; a claim held open sees it at its first re-check after that
(`claims.claim`, every CLAIM_RECHECK_INTERVAL).
"""

import bisect
import threading
import time
from collections import Counter
from datetime import datetime, timezone

from banyan.server.document_locks import takes_document_locks
from banyan.server.store import aware

#: Candidates one shared read keeps. FerretDB 1.x fetches and sorts every
#: ready task whatever the limit (2,000 ready: the same time for 512 as for
#: all), so the read keeps many: one that holds every ready task answers
#: "nothing fits" by itself, without a read of the claim's own.
SHARED_READ_SIZE = 4096
#: Seconds a shared read serves claims before it is read again (tasks made
#: ready through other servers wait this long to be seen)...
SHARED_READ_SECONDS = 0.5
#: ... or this many times as long as the read took, on a store so busy that
#: a read takes longer (FerretDB at 0.3 s a query: reads again at most a
#: fifth of the time, not for every claim).
SHARED_READ_SPACING = 4
#: ... but never longer than this: the bound on how late a claim of this
#: process sees a task made ready through another server (a read of 2,000
#: ready tasks took 1 s and more on a loaded FerretDB: three servers each
#: reading for 1 s every 2 s would keep it reading 1.5 s a second).
SHARED_READ_MAX_SECONDS = 5.0

#: The fields of a task its place among the candidates and its claim need.
CANDIDATE_FIELDS = frozenset({"_id", "_created", "priority", "requested_resources", "history"})

_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)


def shares_claim_reads(collection):
    """Whether claims on `collection` share one sorted read per process: on
    FerretDB 1.x, which sorts in its own process (the same stores whose
    updates take document locks)."""
    return takes_document_locks(collection)


def claim_key(doc):
    """The claim order (`states.CLAIM_ORDER`) of a task, as a sort key."""
    return (-(doc.get("priority") or 0), aware(doc.get("_created")) or _EARLIEST, doc["_id"])


def _cores(doc):
    return (doc.get("requested_resources") or {}).get("cores") or 0


class ReadyCandidates:
    """The first ready tasks in the claim order, shared by the claimers of
    one process. `read(limit)` returns up to `limit` ready tasks in the claim
    order (with the fields a claim needs)."""

    def __init__(self, read, size=SHARED_READ_SIZE, seconds=SHARED_READ_SECONDS, clock=time.monotonic):
        self._read = read
        self.size = size
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._read_done = threading.Condition(self._lock)
        self._keys: list = []  # claim_key of each candidate, sorted
        self._docs: dict = {}  # _id -> candidate
        self._taken: dict = {}  # _id -> candidate, handed to a claimer of this process
        self._by_cores: Counter = Counter()  # cores requested -> how many candidates request that many
        self._started = None  # clock when the last read started; None: read again
        self._read_took = 0.0  # seconds the last read took
        self._complete = False  # the last read held every ready task
        self._boundary = None  # claim_key of the last task the last read held
        self._nothing_within: list = []  # (clock, bound): a claim's own read found no ready task within bound
        self._changes = 0  # tasks made ready or changed through this process
        # While a read is under way (outside the lock, claims go on from the last one):
        self._reading = False
        self._added_meanwhile: dict = {}  # _id -> task made ready through this process since it started
        self._dropped_meanwhile: set = set()  # candidates claimed (or found not ready) since
        self._forgot_meanwhile = False  # a queued task changed through this process since
        self.reads = 0

    def started(self):
        """When (`clock`) the last read started; None before the first."""
        return self._started

    def interval(self):
        """Seconds a read serves claims, counted from when it started:
        `seconds`, or SHARED_READ_SPACING times as long as the last read
        took on a store so busy that it takes longer, never over
        SHARED_READ_MAX_SECONDS."""
        return min(SHARED_READ_MAX_SECONDS, max(self.seconds, SHARED_READ_SPACING * self._read_took))

    def take(self, accept, n, within=None):
        """Up to `n` candidates, best first, for which `accept(doc)` is true,
        now this caller's until given back or dropped. An empty list when no
        ready task is accepted; None when none of the first `size` is but
        tasks beyond them may be (the caller then reads by itself, and
        tells `found_nothing` when that read found nothing).

        A claim that finds a read past its `interval()` makes the next one,
        unless another claim is making it; claims meanwhile take what the
        last read holds. An empty list is the answer of a read that started
        at most `interval()` before the claim began (waited for if need
        be), with what this process made ready or took since: a read that
        held every ready task and has none the claim accepts needs no new
        read (a worker whose cores are all taken asks for tasks needing
        none after every claim). Nor does a claim for no more than `within`
        (cores, memory, gpus) when, since a claim's own read for at least
        as much found nothing within the same `interval()`, this process
        made no task ready. So a task made ready through another server is
        seen by every claim of this process that begins more than
        `interval()` after (SHARED_READ_MAX_SECONDS at most); a claim held
        open (`claims.claim`) sees it at its next re-check after that."""
        with self._lock:
            began = self.clock()
            renewed = False
            if self._stale(began) and not self._reading:
                self._refresh()
                renewed = True
            picked = self._pick(accept, n, within)
            if not picked and not renewed and (self._stale(began) or self._exhausted()):
                # nothing here, in a read too old to say so or whose first
                # `size` are all taken: the read under way, else a new one
                while self._reading:
                    self._read_done.wait()
                if self._stale(began) or self._exhausted():
                    self._refresh()
                picked = self._pick(accept, n, within)
            if picked or self._complete:
                return picked
            if within is not None and self._known_empty(within):
                return []
            return None

    def own_read(self):
        """A mark for a claim about to read by itself (`take` answered
        None), to hand to `found_nothing` if that read finds nothing."""
        with self._lock:
            return self.clock(), self._changes

    def found_nothing(self, within, mark):
        """A claim's own read, begun at `mark` (`own_read`), found no ready
        task that asks for no more than `within` (leaving out none)."""
        started, changes = mark
        with self._lock:
            if changes == self._changes:
                self._nothing_within.append((started, dict(within)))

    def give_back(self, docs):
        """Candidates a claimer took and did not claim, for the next claimer."""
        with self._lock:
            for doc in docs:
                if self._taken.pop(doc["_id"], None) is not None:
                    self._insert(doc)

    def drop(self, ids):
        """Candidates a claimer took that are claimed or no longer ready."""
        with self._lock:
            for doc_id in ids:
                self._taken.pop(doc_id, None)
            if self._reading:
                self._dropped_meanwhile.update(ids)

    def add(self, doc):
        """A task that became ready through this process (as stored; read
        with fewer fields than a claim needs, it makes the next claim read
        again)."""
        with self._lock:
            self._changed()
            usable = CANDIDATE_FIELDS.issubset(doc)
            if self._reading:
                if usable:
                    self._added_meanwhile[doc["_id"]] = doc
                else:
                    self._forgot_meanwhile = True
            if self._started is None or doc["_id"] in self._taken:
                return
            self._discard(doc["_id"])
            if usable:
                self._insert(doc)
            else:
                self._started = None

    def forget(self):
        """A queued task changed (its priority, resources or hold): the next
        claim reads again."""
        with self._lock:
            self._changed()
            self._started = None
            if self._reading:
                self._forgot_meanwhile = True

    def _stale(self, began):
        """Whether the last read started more than `interval()` before `began`."""
        return self._started is None or began - self._started > self.interval()

    def _exhausted(self):
        """Every candidate of the last read is taken or gone."""
        return not self._complete and not self._docs

    def _known_empty(self, within):
        now, interval = self.clock(), self.interval()
        self._nothing_within = [(at, bound) for at, bound in self._nothing_within if now - at <= interval]
        return any(
            all(value <= bound.get(key, 0) for key, value in within.items()) for _, bound in self._nothing_within
        )

    def _changed(self):
        self._changes += 1
        self._nothing_within = []

    def _refresh(self):
        """Read again, outside the lock (held on entry and on return), then
        put in what this process changed meanwhile."""
        self._reading = True
        self._added_meanwhile, self._dropped_meanwhile, self._forgot_meanwhile = {}, set(), False
        self._lock.release()
        try:
            started = self.clock()
            docs = self._read(self.size)
            took = self.clock() - started
        finally:
            self._lock.acquire()
            self._reading = False
            self._read_done.notify_all()
        self.reads += 1
        self._started = None if self._forgot_meanwhile else started
        self._read_took = took
        self._complete = len(docs) < self.size
        self._boundary = claim_key(docs[-1]) if docs else None
        gone = self._taken.keys() | self._dropped_meanwhile
        self._docs = {doc["_id"]: doc for doc in docs if doc["_id"] not in gone}
        self._keys = sorted(claim_key(doc) for doc in self._docs.values())
        self._by_cores = Counter(_cores(doc) for doc in self._docs.values())
        for doc in self._added_meanwhile.values():
            if doc["_id"] not in self._taken:
                self._discard(doc["_id"])
                self._insert(doc)

    def _pick(self, accept, n, within=None):
        if within is not None and not any(
            count and cores <= within.get("cores", 0) for cores, count in self._by_cores.items()
        ):
            # none asks for few enough cores: no walk over every candidate (a
            # worker whose cores are all taken asks after each of its claims)
            return []
        picked = []
        for key in self._keys:
            if len(picked) >= n:
                break
            doc = self._docs[key[2]]
            if accept(doc):
                picked.append(doc)
        for doc in picked:
            self._discard(doc["_id"])
            self._taken[doc["_id"]] = doc
        return picked

    def _insert(self, doc):
        """Keep `doc` among the candidates, unless the last read stopped
        before it (then tasks it did not read may come first)."""
        key = claim_key(doc)
        if self._started is None or (not self._complete and key > self._boundary):
            return
        self._discard(doc["_id"])
        self._docs[doc["_id"]] = doc
        self._by_cores[_cores(doc)] += 1
        bisect.insort(self._keys, key)

    def _discard(self, doc_id):
        doc = self._docs.pop(doc_id, None)
        if doc is not None:
            self._by_cores[_cores(doc)] -= 1
            key = claim_key(doc)
            index = bisect.bisect_left(self._keys, key)
            if index < len(self._keys) and self._keys[index] == key:
                del self._keys[index]
