"""The worker registry: the `workers` collection and a worker's states.

A worker is `active` from registration until it unregisters (`stopped`) or
stays silent past the heartbeat timeout (`lost`). Every change is one
single-document update whose filter carries the state it starts from, so
several server processes can share one MongoDB.
"""

import logging
import time
from datetime import timedelta

from bson import ObjectId
from pymongo import ReturnDocument

from banyan.protocol import WorkerState
from banyan.server.states import WORKERS, utcnow

log = logging.getLogger(__name__)


class WorkerRegistry:
    """The `workers` collection: registration and liveness.

    A worker is `active` from registration until it unregisters (`stopped`)
    or stays silent past the heartbeat timeout (`lost`). Marking it lost sets
    `abandon_pending`, cleared only once its tasks were abandoned, so a
    reaper that dies half way is finished by the next one.
    """

    def __init__(self, db):
        self.workers = db[WORKERS]
        self._offers = None  # (distinct resources of the active workers, when read)

    def register(self, host, resources, token_id=None):
        now = utcnow()
        doc = {
            "_id": ObjectId(),
            "host": host,
            "resources": resources,
            "state": WorkerState.ACTIVE.value,
            "registered": now,
            "last_heartbeat": now,
            "stopped": None,
            "token_id": token_id,
            "abandon_pending": False,
            "_created": now,
            "_updated": now,
        }
        self.workers.insert_one(doc)
        self._offers = None
        return doc

    def get(self, worker_id):
        return self.workers.find_one({"_id": worker_id})

    def list(self, state=None, query=None):
        query = dict(query or {})
        if state:
            query = {"$and": [query, {"state": state}]} if query else {"state": state}
        return list(self.workers.find(query).sort("registered", 1))

    def touch(self, worker_id, now=None):
        """A sign of life: the worker document if it is active, else None."""
        now = now or utcnow()
        return self.workers.find_one_and_update(
            {"_id": worker_id, "state": WorkerState.ACTIVE.value},
            {"$set": {"last_heartbeat": now, "_updated": now}},
            return_document=ReturnDocument.AFTER,
        )

    def is_active(self, worker_id):
        return self.workers.find_one({"_id": worker_id, "state": WorkerState.ACTIVE.value}, {"_id": 1}) is not None

    #: Seconds an in-process count of active workers is reused.
    COUNT_TTL = 5.0

    def active_count(self):
        """How many workers are active, counted at most every COUNT_TTL
        seconds (it only sizes retry delays)."""
        now = time.monotonic()
        cached = getattr(self, "_active_count", None)
        if cached is None or now - cached[1] > self.COUNT_TTL:
            cached = (self.workers.count_documents({"state": WorkerState.ACTIVE.value}), now)
            self._active_count = cached
        return cached[0]

    #: Seconds the in-process list of what the active workers offer is reused.
    OFFERS_TTL = 1.0

    def active_offers(self):
        """The resources the active workers offer, once per distinct offer
        (`[{"resources": {...}}]`), read at most every OFFERS_TTL seconds and
        again after this process registered, stopped or lost a worker. They
        only explain why a queued task waits (`reasons`): read for each
        user's read of a queued task, 300 workers made it six times as costly."""
        now = time.monotonic()
        cached = self._offers
        if cached is None or now - cached[1] > self.OFFERS_TTL:
            distinct = {}
            for doc in self.workers.find({"state": WorkerState.ACTIVE.value}, {"resources": 1}):
                resources = doc.get("resources") or {}
                distinct.setdefault(repr(sorted(resources.items())), {"resources": resources})
            cached = self._offers = (list(distinct.values()), now)
        return cached[0]

    def active_ids(self):
        return [d["_id"] for d in self.workers.find({"state": WorkerState.ACTIVE.value}, {"_id": 1})]

    def stop(self, worker_id):
        """Clean unregister; True if this call stopped it. Its tasks still
        need abandoning (`abandon_pending`)."""
        now = utcnow()
        self._offers = None
        return (
            self.workers.update_one(
                {"_id": worker_id, "state": WorkerState.ACTIVE.value},
                {
                    "$set": {
                        "state": WorkerState.STOPPED.value,
                        "stopped": now,
                        "_updated": now,
                        "abandon_pending": True,
                    }
                },
            ).modified_count
            == 1
        )

    def mark_silent_lost(self, timeout, now=None):
        """Mark lost the active workers silent for more than `timeout`
        seconds; returns their ids. A heartbeat that lands first wins (the
        filter carries the `last_heartbeat` that was read)."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=timeout)
        lost = []
        for doc in self.workers.find(
            {"state": WorkerState.ACTIVE.value, "last_heartbeat": {"$lt": cutoff}}, {"last_heartbeat": 1}
        ):
            result = self.workers.update_one(
                {"_id": doc["_id"], "state": WorkerState.ACTIVE.value, "last_heartbeat": doc["last_heartbeat"]},
                {"$set": {"state": WorkerState.LOST.value, "lost": now, "_updated": now, "abandon_pending": True}},
            )
            if result.modified_count:
                log.warning("worker %s silent since %s: marked lost", doc["_id"], doc["last_heartbeat"])
                lost.append(doc["_id"])
        if lost:
            self._offers = None
        return lost

    def pending_abandon(self):
        return [d["_id"] for d in self.workers.find({"abandon_pending": True}, {"_id": 1})]

    def abandoned(self, worker_id):
        self.workers.update_one({"_id": worker_id, "abandon_pending": True}, {"$set": {"abandon_pending": False}})


def abandon_worker(registry, queue, worker_id):
    """End the attempts a worker that is gone still holds (retry rules apply)."""
    ended = queue.abandon(worker_id)
    registry.abandoned(worker_id)
    return ended
