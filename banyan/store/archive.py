"""Retention: finished tasks moved out of the live store into compressed
JSON-lines files beside it (`DIR/archive/tasks-<time>.jsonl.gz`), one task
per line as the API shows it (ids as strings, dates in the API's format).

A task is archived only when it finished before the cut-off, its own
continuations have all finished, and no unfinished task still lists it
among its continuations: nothing unfinished depends on it. The file is
written and synced before the tasks leave the store (one atomic delete), so
a crash in between leaves them in both places, never in neither.
"""

import datetime
import glob
import gzip
import json
import logging
import os
import threading
import time

from bson import ObjectId

from banyan import protocol

log = logging.getLogger(__name__)

FINISHED = [s.value for s in protocol.FINISHED]
ARCHIVE_DIR = "archive"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # banyan.settings.DATE_FORMAT
_BATCH = 1000


def _jsonable(value):
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc)
        return value.strftime(DATE_FORMAT)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def archivable(tasks, before):
    """Ids of the finished tasks last changed before `before` that nothing
    unfinished depends on."""
    finished = {}
    for doc in tasks.find(
        {"state": {"$in": list(FINISHED)}, "_updated": {"$lt": before}}, {"_id": 1, "continuations": 1}
    ):
        finished[doc["_id"]] = doc.get("continuations") or []
    unfinished_children = set()
    children = {c for kids in finished.values() for c in kids}
    for start in range(0, len(children), _BATCH):
        batch = list(children)[start : start + _BATCH]
        unfinished_children.update(
            d["_id"] for d in tasks.find({"_id": {"$in": batch}, "state": {"$nin": list(FINISHED)}}, {"_id": 1})
        )
    held_by_parent = set()
    ids = list(finished)
    for start in range(0, len(ids), _BATCH):
        for parent in tasks.find(
            {"continuations": {"$in": ids[start : start + _BATCH]}, "state": {"$nin": list(FINISHED)}},
            {"continuations": 1},
        ):
            held_by_parent.update(parent.get("continuations") or [])
    return [
        tid
        for tid, kids in finished.items()
        if tid not in held_by_parent and not any(k in unfinished_children for k in kids)
    ]


def archive(db, data_dir, before):
    """Move the archivable tasks of `db` into a new archive file under
    data_dir; returns (count, path or None)."""
    tasks = db["tasks"]
    ids = archivable(tasks, before)
    if not ids:
        return 0, None
    folder = os.path.join(data_dir, ARCHIVE_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tasks-%s.jsonl.gz" % time.strftime("%Y%m%dT%H%M%S"))
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb") as out:
            for start in range(0, len(ids), _BATCH):
                for doc in tasks.find({"_id": {"$in": ids[start : start + _BATCH]}}):
                    out.write(json.dumps(_jsonable(doc), sort_keys=True).encode() + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    tasks.delete_many({"_id": {"$in": ids}})
    return len(ids), path


def read(data_dir):
    """Every archived task under data_dir, oldest file first."""
    for path in sorted(glob.glob(os.path.join(data_dir, ARCHIVE_DIR, "tasks-*.jsonl.gz"))):
        with gzip.open(path, "rt") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


class Archiver(threading.Thread):
    """`banyan server --archive-after DAYS`: every `every` seconds, archive
    the tasks that finished more than `after` seconds ago, so that the live
    store's memory stays flat over months of use."""

    def __init__(self, db, data_dir, after, every=3600.0):
        super().__init__(name="banyan-archiver", daemon=True)
        self.db, self.data_dir, self.after, self.every = db, data_dir, after, every
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.every):
            self.run_once()

    def run_once(self):
        before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=self.after)
        try:
            count, path = archive(self.db, self.data_dir, before)
        except Exception:  # pylint: disable=broad-except  # a failed round is tried again next time
            log.exception("archiving finished tasks failed; trying again in %.0f s", self.every)
            return
        if count:
            log.info("archived %d finished tasks to %s", count, path)

    def stop(self):
        self.stopping.set()
