"""The embedded store's engine: one lock, change tracking, the journal and
snapshots (their format: `banyan.store.journal`).

A call's changes are applied in memory under the lock and its journal
record is appended before the lock is released; a record that cannot be
written rolls the changes back. `one_sync` lets a request's writes share one
fdatasync (group commit: the sync runs outside the lock). Compaction holds
the lock only to copy what the snapshot will hold and to switch the journal
to a new segment; the snapshot is written without it (`compact`).
"""

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

from bson.raw_bson import RawBSONDocument
from pymongo.errors import InvalidOperation

from banyan.store import journal, state
from banyan.store.documents import encode, raw_id
from banyan.store.errors import StoreCorrupt, StoreUnavailable
from banyan.store.planning import store_key

logger = logging.getLogger(__name__)

_SNAPSHOT = journal.SNAPSHOT
_JOURNAL = journal.JOURNAL
_SNAPSHOT_CHUNK = 1000
#: Stores whose snapshot would be larger than this are compacted by a
#: thread, writes and reads going on meanwhile; smaller ones (a few
#: milliseconds to write) at once, by the call that crossed the limit.
BACKGROUND_BYTES = 4 << 20

# ---------------------------------------------------------------------------
# Journal, snapshot and the per-client lock (the file format and its reading
# live in banyan.store.journal).
# ---------------------------------------------------------------------------

_frame = journal.frame


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_fdatasync = getattr(os, "fdatasync", os.fsync)


def _give_back_memory():
    """Hand the memory a load used and freed (the files' records, their
    decoding) back to the system: glibc keeps it in its heap otherwise, a
    fifth of the server's resident memory after a start."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    trim(0)


class Engine:
    """Lock, change tracking, journal and snapshots of one EmbeddedClient.

    A call's changes are applied in memory under the lock and its journal
    record is appended before the lock is released; when the record cannot
    be written (ENOSPC, EIO, EROFS) the changes are rolled back, still under
    the lock, so no other call ever saw them, and the call raises
    StoreUnavailable. The next call simply tries again: the store serves
    again by itself once space is back.
    """

    def __init__(self, data_dir, compact_bytes):
        self.data_dir = os.path.abspath(data_dir)
        self.journal_path = os.path.join(self.data_dir, _JOURNAL)  # the journal segment written to
        self.segments = []  # paths of the journal files the snapshot does not hold, oldest first
        self.older_bytes = 0  # their size, but for the last one (journal_size)
        self.snapshot_bytes = 0  # the size of the last snapshot read or written
        self.threads = []  # the store's own threads (compaction, view builds), joined at close
        self.saving_views = False
        self.compacting = False
        self.closing = False
        self.snapshot_path = os.path.join(self.data_dir, _SNAPSHOT)
        self.compact_bytes = compact_bytes
        self.next_compact = compact_bytes
        self.lock = threading.RLock()
        self.sync_lock = threading.Lock()
        self.waiters_lock = threading.Lock()
        self.waiters = 0  # threads waiting for `lock`
        self.urgent = threading.local()  # .on: this thread's calls go first (`first`)
        self.urgent_waiters = 0  # of them, those of threads marked urgent
        self.urgent_longest = 0.005  # seconds a call lets them in first, at most
        self.batch = threading.local()
        self.depth = 0
        self.events = []
        self.docinfo = {}
        self.undo = {}  # (id(store), key) -> (store, key, document before the call or None)
        self.carried = []  # schema actions of a rolled-back call, journaled with the next record
        self.hints = []  # actions that change nothing (a view's definition), journaled with the call's
        self.views_built = 0  # views built from every document (at start, or at the first read asking)
        self.views_building = 0  # builds under way
        self.views_activity = 0.0  # time.monotonic() of the last start or end of a build
        self.tail_dirty = False  # a failed append may have left part of a record at the end
        self.broken = None  # why every call is refused (a failed sync), or None
        self.replaying = False
        self.closed = False
        self.server_store = None
        self.rows_factory = None
        self.saved_views = set()  # (database, collection, stages, view) of the views the snapshot holds
        self.writing_views = None  # those of the snapshot being written
        self.fd = None
        self.lock_fd = None
        self.journal_size = 0
        self.written_seq = 0
        self.synced_seq = 0

    # -- change tracking ---------------------------------------------------
    def note(self, action):
        if not self.replaying:
            self.events.append(("raw", action))

    def note_hint(self, action):
        """Journal `action`, which changes nothing (a view's definition: a
        later start that finds the view not built in its snapshot builds it
        at once), with the next record: a read that defines a view writes
        nothing itself."""
        if not self.replaying:
            self.hints.append(action)

    def note_undo(self, store, key, before):
        """`store[key]` is about to change; `before` is what to put back
        (None: nothing) if the call's record cannot be written."""
        if self.replaying:
            return
        k = (id(store), key)
        if k not in self.undo:
            self.undo[k] = (store, key, before)

    def note_doc(self, store, key, doc_id, forced=False, before=None):
        if self.replaying:
            return
        k = (id(store), key)
        info = self.docinfo.get(k)
        if info is None:
            self.docinfo[k] = [store, key, doc_id, before, forced]
        elif forced:
            info[4] = True
        self.events.append(("doc", k))

    def note_touch(self, store, key, doc_id, before):
        """`store[key]` (BSON `before`) is about to change in place."""
        if self.replaying:
            return
        k = (id(store), key)
        if k in self.docinfo:
            self.events.append(("doc", k))
        else:
            self.note_doc(store, key, doc_id, before=before)

    # -- operations --------------------------------------------------------
    @contextlib.contextmanager
    def op(self):
        """Run one client call atomically; journal its changes durably."""
        self._acquire()
        if self.urgent_waiters and self.depth == 0 and not getattr(self.urgent, "on", False):
            # a call of a thread marked urgent waits: it goes first
            self.lock.release()
            self.let_waiters_in(self.urgent_longest, urgent=True)
            self._acquire()
        seq = None
        try:
            if self.closed:
                raise InvalidOperation("Cannot use the embedded store after close()")
            if self.broken:
                raise StoreUnavailable(self.broken)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    if self.events:
                        seq = self._commit()
                    self.undo = {}
        finally:
            self.lock.release()
        if seq is not None:
            if getattr(self.batch, "seq", None) is not None:
                self.batch.seq = max(self.batch.seq, seq)
            else:
                self._sync(seq)

    def _acquire(self):
        if not self.lock.acquire(blocking=False):
            urgent = getattr(self.urgent, "on", False)
            with self.waiters_lock:
                self.waiters += 1
                self.urgent_waiters += urgent
            try:
                self.lock.acquire()
            finally:
                with self.waiters_lock:
                    self.waiters -= 1
                    self.urgent_waiters -= urgent

    def let_waiters_in(self, longest=0.005, urgent=False):
        """Between two slices of a long read (the lock released): let the
        calls waiting for the lock (`urgent`: those of urgent threads) take
        it first. A released lock is otherwise taken straight back by the
        thread that released it, which holds the interpreter, and the others
        wait for the whole read."""
        deadline = time.monotonic() + longest
        while (self.urgent_waiters if urgent else self.waiters) and time.monotonic() < deadline:
            time.sleep(0.0001)

    @contextlib.contextmanager
    def first(self):
        """This thread's calls inside go ahead of other threads' calls that
        wait for the lock with them (a server's answers to its users, while
        its workers' requests take turns): each other thread's next call
        lets them in first, for at most a few milliseconds."""
        before = getattr(self.urgent, "on", False)
        self.urgent.on = True
        try:
            yield
        finally:
            self.urgent.on = before

    @contextlib.contextmanager
    def one_sync(self):
        """Writes of this thread inside share one fdatasync, done on exit:
        a request's writes are durable before its answer, for one sync
        instead of one per write. The journal is sequential, so any later
        sync (another thread's) covers them too."""
        if getattr(self.batch, "seq", None) is not None:  # nested: the outer one syncs
            yield
            return
        self.batch.seq = 0
        try:
            yield
        finally:
            seq, self.batch.seq = self.batch.seq, None
            if seq:
                self._sync(seq)

    def _commit(self):
        """Append the call's record, or roll its changes back and raise."""
        events, docinfo, undo = self.events, self.docinfo, self.undo
        self.events, self.docinfo, self.undo = [], {}, {}
        carried, self.carried = self.carried, []
        hints, self.hints = self.hints, []
        try:
            actions = carried + hints + self._actions(events, docinfo)
            if not actions:
                return None
            self._append(_frame(actions))
        except BaseException as err:
            self._roll_back(undo)
            # creations, drops and indexes stay in memory: journal them next time
            self.carried = carried + hints + [payload for kind, payload in events if kind == "raw"]
            if isinstance(err, OSError):
                raise StoreUnavailable.from_os_error(err, "writing the journal", self.journal_path) from err
            raise
        self.written_seq += 1
        seq = self.written_seq
        if self.older_bytes + self.journal_size > self.next_compact and not self.compacting and not self.closing:
            self.compact(background=self.snapshot_bytes + self.older_bytes + self.journal_size > BACKGROUND_BYTES)
        return seq

    @staticmethod
    def _actions(events, docinfo):
        last = {}
        for i, (kind, k) in enumerate(events):
            if kind == "doc":
                last[k] = i
        actions = []
        for i, (kind, payload) in enumerate(events):
            if kind == "raw":
                actions.append(payload)
                continue
            if last[payload] != i:
                continue
            store, key, doc_id, before, forced = docinfo[payload]
            raw = store._documents.raw(key)  # pylint: disable=protected-access
            if raw is None:
                actions.append({"o": "x", "d": store.db_name, "c": store.name, "id": doc_id})
                continue
            if forced or raw != before:
                actions.append({"o": "p", "d": store.db_name, "c": store.name, "docs": [RawBSONDocument(raw)]})
        return actions

    def _append(self, record):
        """Write `record` at the end of the journal, whole or not at all."""
        if self.tail_dirty:  # what a failed append left, cut before anything follows it
            os.ftruncate(self.fd, self.journal_size)
            self.tail_dirty = False
        if self.journal_size == 0:
            record = journal.format_record() + record
        try:
            _write_all(self.fd, record)
        except BaseException:
            self.tail_dirty = True
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.journal_size)
                self.tail_dirty = False
            raise
        self.journal_size += len(record)

    def _roll_back(self, undo):
        self.replaying = True  # nothing of the undoing is journaled
        try:
            for store, key, before in undo.values():
                store.restore(key, before)
        finally:
            self.replaying = False

    def sync_written(self):
        """Make every record written so far durable."""
        self._sync(self.written_seq)

    def _sync(self, seq):
        """Group commit: one fdatasync covers every record written so far.
        A failed sync leaves records in memory that may not be on disk, so
        the store then refuses every call until it is opened again."""
        if self.synced_seq >= seq:
            return
        with self.sync_lock:
            if self.synced_seq >= seq or self.fd is None:
                return
            if self.broken:
                raise StoreUnavailable(self.broken)
            target = self.written_seq
            self._sync_fd(self.fd)
            if target > self.synced_seq:
                self.synced_seq = target

    def _sync_fd(self, fd):
        """fdatasync the journal (`sync_lock` held); a failure stops the store."""
        try:
            _fdatasync(fd)
        except OSError as err:
            failure = StoreUnavailable.from_os_error(err, "syncing the journal", self.journal_path)
            self.broken = (
                "the embedded store stopped after a failed journal sync (%s): the last "
                "changes may not be on disk, so it refuses every request until the "
                "server is restarted" % (err.strerror or err)
            )
            logger.error("%s", self.broken)
            raise failure from err

    # -- files -------------------------------------------------------------
    def open(self, server_store, rows_factory=None):
        """Load the snapshot and the journal into `server_store`.
        `rows_factory(db, collection, prefix)` makes the rows_of function of
        a view set a snapshot held (`banyan.store.state`)."""
        self.server_store = server_store
        self.rows_factory = rows_factory
        os.makedirs(self.data_dir, exist_ok=True)
        if fcntl is not None:
            self.lock_fd = os.open(os.path.join(self.data_dir, journal.LOCKFILE), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(self.lock_fd)
                self.lock_fd = None
                raise RuntimeError(f"{self.data_dir} is in use by another Banyan process") from err
        collecting = gc.isenabled()
        gc.disable()  # a load makes millions of objects, none of them garbage: the collector's passes cost 40% of it
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        finally:
            if collecting:
                gc.enable()
        _give_back_memory()

    def _load(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.snapshot_path + ".tmp")  # a compaction cut short
        snapshot = journal.read(self.snapshot_path)
        if snapshot is not None:
            self._check_snapshot(snapshot)
            self.snapshot_bytes = snapshot.size
        logs = [journal.read(os.path.join(self.data_dir, name)) for name in journal.journal_names(self.data_dir)]
        logs = [log for log in logs if log is not None]
        for log in logs:
            if log.damage:
                raise StoreCorrupt(log.refusal(self.data_dir))
        logged = sum(log.size for log in logs)
        self.replaying = True
        try:
            if snapshot is not None:
                # Each change the journal replays over a loaded state is
                # indexed alone, about three times what indexing it in the
                # bulk build costs: past a quarter of the snapshot, a build
                # from every document is cheaper.
                self._replay_snapshot(snapshot, use_state=logged < snapshot.size // 4)
            for log in logs:
                for offset, _, actions in log.records:
                    self._replay(log.path, offset, actions)
        finally:
            self.replaying = False
        for store in self.server_store.collection_stores():
            store.finish_loading()
        self.segments = [log.path for log in logs] or [self.journal_path]
        self.journal_path = self.segments[-1]  # new records go to the newest segment
        self.fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for log in logs:
            if log.tail is None:
                continue
            logger.warning(
                "journal %s: dropped a torn last record, %d bytes at offset %d (%s): "
                "a write cut short by a crash, never acknowledged",
                log.path,
                log.tail.length,
                log.tail.offset,
                log.tail.reason,
            )
            if log is logs[-1]:
                os.ftruncate(self.fd, log.valid_end)
                os.fsync(self.fd)
        self.journal_size = logs[-1].valid_end if logs else 0
        self.older_bytes = sum(log.size for log in logs[:-1])
        journal.fsync_dir(self.data_dir)
        if any(True for log in logs for _ in log.actions()):
            logger.info("replayed %d journal records from %s", sum(len(log.records) for log in logs), self.data_dir)
        # A valid journal is as good as a snapshot: fold it in at start only
        # when it is long, in segments a compaction left (or the snapshot is
        # missing or in an older format).
        if (
            logged > self.compact_bytes
            or len(logs) > 1
            or snapshot is None
            or snapshot.version < journal.FORMAT_VERSION
        ):
            self.compact(background=self.snapshot_bytes + logged > BACKGROUND_BYTES)

    def _check_snapshot(self, scan):
        """A snapshot is written whole and renamed into place: any damage,
        even at its end, is corruption."""
        bad = scan.damage + ([scan.tail] if scan.tail is not None else [])
        complete = any(a.get("o") == "end" for a in scan.actions())
        if bad or not complete:
            what = bad[0].describe() if bad else "it has no end record"
            raise StoreCorrupt(
                "%s is damaged: %s. The store refuses to start rather than lose what it holds. See "
                "the damage with `banyan store check %s`, then salvage every valid record with "
                "`banyan store repair %s` (it keeps the original file)."
                % (scan.path, what, self.data_dir, self.data_dir)
            )

    def _replay_snapshot(self, scan, use_state=True):
        """Replay the snapshot, taking the state it holds of each
        collection (`banyan.store.state`) when it was computed from the
        documents just read (and `use_state`), and computing it again
        otherwise."""
        digests = {}  # (database, collection) -> digest of its document records so far
        for (offset, _, actions), crc in zip(scan.records, scan.crcs):
            first = actions[0] if len(actions) == 1 else {}
            if first.get("o") == "p":
                where = (first["d"], first["c"])
                digests[where] = state.chain(digests.get(where, 0), crc)
            elif first.get("o") == "state":
                if use_state:
                    self._take_state(scan.path, first, digests.get((first.get("d"), first.get("c")), 0))
                continue
            self._replay(scan.path, offset, actions)

    def _take_state(self, path, action, digest):
        try:
            store = self.server_store[action["d"]][action["c"]]
            documents = len(store._documents)  # pylint: disable=protected-access
            store.import_state(state.load(action, documents, digest), self.rows_factory)
        except (state.Mismatch, KeyError, TypeError) as why:
            logger.warning(
                "%s: the indexes and views of %s.%s it holds are not used (%s): "
                "they are computed again from the documents",
                path,
                action.get("d"),
                action.get("c"),
                why,
            )
            return
        self.saved_views.update(
            (action["d"], action["c"], prefix, name)
            for prefix, view_set in store.view_sets.items()
            for name, view in view_set.views.items()
            if view_set.built(view)
        )
        logger.info(
            "%s: loaded the indexes and views of %s.%s (%d documents)", path, action["d"], action["c"], documents
        )

    def _replay(self, path, offset, actions):
        for action in actions:
            if action.get("o") in ("format", "end"):
                continue
            try:
                self._apply(action)
            except Exception as err:  # pylint: disable=broad-except
                raise StoreCorrupt(
                    "%s: the record at offset %d cannot be applied (%s); see "
                    "`banyan store check %s`" % (path, offset, err, self.data_dir)
                ) from err

    def _apply(self, action):
        """Apply one journal action (idempotent)."""
        store = self.server_store[action["d"]][action["c"]]
        op = action["o"]
        if op == "p":
            if store.deferred:  # a load, indexed at its end: the documents are only stored
                store.load_raw([encode(doc) for doc in action["docs"]])
                return
            for doc in action["docs"]:
                raw = encode(doc)
                store[store_key(raw_id(raw))] = raw
        elif op == "x":
            key = store_key(action["id"])
            if key in store._documents:  # pylint: disable=protected-access
                del store[key]
        elif op == "drop":
            store.drop()
        elif op == "mk":
            store.create()
        elif op == "ix":
            spec = dict(action["s"])
            spec["key"] = [tuple(k) for k in spec["key"]]
            store.create_index(action["n"], spec)
        elif op == "dx":
            if action["n"] in store.indexes:
                store.drop_index(action["n"])
        elif op == "view":
            try:
                store.define_view(action["p"], action["t"])
            except Exception as err:  # pylint: disable=broad-except  # a view is no data: it is built when asked
                logger.warning("a view of %s.%s is not built at start (%s)", action["d"], action["c"], err)
        else:
            raise RuntimeError(f"unknown journal action {op!r}")

    def _freeze(self):
        """What a snapshot of the store now holds, as copies later calls do
        not change: per collection, its head record's actions, its
        documents' BSON (immutable bytes) and its state. Taken under the
        lock; the snapshot is then written from it without the lock."""
        frozen = []
        for store in self.server_store.collection_stores():
            if not store.is_created:
                continue
            db_name, col_name = store.db_name, store.name
            head = [{"o": "mk", "d": db_name, "c": col_name}]
            for name, spec in store.indexes.items():
                head.append({"o": "ix", "d": db_name, "c": col_name, "n": name, "s": spec})
            head.extend(store.view_definitions())
            raws = list(store._documents.raw_values())  # pylint: disable=protected-access
            frozen.append((db_name, col_name, head, raws, store.export_state()))
        return frozen

    def _snapshot_frames(self, frozen, written_views):
        """The records of a snapshot of `frozen` (`_freeze`), in pieces;
        adds the views whose state it holds to `written_views`."""
        yield journal.format_record()
        for db_name, col_name, head, raws, exported in frozen:
            yield _frame(head)
            digest = 0
            for i in range(0, len(raws), _SNAPSHOT_CHUNK):
                docs = [RawBSONDocument(raw) for raw in raws[i : i + _SNAPSHOT_CHUNK]]
                record = _frame([{"o": "p", "d": db_name, "c": col_name, "docs": docs}])
                digest = state.chain(digest, journal.HEADER.unpack_from(record)[2])
                yield record
            try:
                dumped = None if exported is None else state.dump(exported)
            except Exception as err:  # pylint: disable=broad-except  # the next start computes it: no loss
                logger.warning("could not write the indexes and views of %s.%s (%s)", db_name, col_name, err)
                dumped = None
            if dumped is None:
                continue
            written_views.update(
                (db_name, col_name, prefix, name) for prefix, built in exported["views"].items() for name in built
            )
            action = {"o": "state", "d": db_name, "c": col_name, "v": state.VERSION, "n": len(raws), "digest": digest}
            yield from journal.frame_pieces(action, "state", dumped)
        yield _frame([{"o": "end"}])

    def compact(self, background=False):
        """Write a snapshot atomically, then remove the journal it holds.

        Under the lock, only a copy of the store is taken (`_freeze`) and
        new records are sent to a new journal segment; the snapshot is
        written without the lock (by a thread when `background`), and the
        older segments are removed once it is in place. Fails safe: when
        the snapshot cannot be written (no space) the journal is kept as
        it is, and compaction is tried again after more writes. Returns
        whether a snapshot was written (started, when `background`)."""
        with self.lock:
            if self.compacting or self.broken:
                return False
            held = time.monotonic()
            try:
                frozen = self._freeze()
                self._new_segment()
            except OSError as err:
                self._compaction_failed(err)
                return False
            self.compacting = True
            older = self.segments[:-1]
            held = time.monotonic() - held
        if background:
            self.start(lambda: self._write_snapshot(frozen, older, held), "banyan-store-compaction")
            return True
        return self._write_snapshot(frozen, older, held)

    def start(self, work, name):
        """Run `work` in a thread of the store's own, which close waits for."""
        thread = threading.Thread(target=work, name=name, daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def save_views(self, settle=1.0):
        """Views were just built: a large store writes them into a snapshot
        (in the background, once no view was built for `settle` seconds:
        `/stats` builds several), so that a start after a crash loads them
        instead of building them again, a pass over every document. A small
        store, quick to build them again, keeps them at its next compaction
        or close."""
        with self.lock:
            if self.saving_views or self.closing or self.fd is None:
                return
            if self.snapshot_bytes + self.older_bytes + self.journal_size <= BACKGROUND_BYTES:
                return
            self.saving_views = True

        def save():
            try:
                while not self.closing and (
                    self.views_building or self.compacting or time.monotonic() - self.views_activity < settle
                ):
                    time.sleep(settle / 4)
                with self.lock:
                    if self.closing or self.broken or self.built_views() <= self.saved_views:
                        return
                self.compact()
            finally:
                self.saving_views = False

        self.start(save, "banyan-store-save-views")

    def _new_segment(self):
        """Send new records to a new journal segment (the lock held). The
        records written so far are synced first: a later sync is of the
        new segment, and must not leave them behind."""
        number = max(journal.segment_number(path) for path in self.segments) + 1
        path = os.path.join(self.data_dir, journal.segment_name(number))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            journal.fsync_dir(self.data_dir)  # its name is durable before any record acknowledged in it
            with self.sync_lock:
                if self.tail_dirty:
                    os.ftruncate(self.fd, self.journal_size)
                self._sync_fd(self.fd)
                old, self.fd = self.fd, fd
                self.synced_seq = max(self.synced_seq, self.written_seq)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
        os.close(old)
        self.older_bytes += self.journal_size
        self.journal_size = 0
        self.tail_dirty = False
        self.segments.append(path)
        self.journal_path = path

    def _write_snapshot(self, frozen, older, held=0.0):
        """Write the snapshot of `frozen`, then (the lock held) remove the
        journal segments `older`, which it holds, oldest first, and name
        the segment written to now `journal.bnj`."""
        tmp = self.snapshot_path + ".tmp"
        written_views = set()
        started = time.monotonic()
        try:
            try:
                with open(tmp, "wb") as f:
                    for frame in self._snapshot_frames(frozen, written_views):
                        f.write(frame)
                    f.flush()
                    os.fsync(f.fileno())
                    size = f.tell()
                os.replace(tmp, self.snapshot_path)
                journal.fsync_dir(self.data_dir)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                with self.lock:
                    self._compaction_failed(err)
                return False
            with self.lock:
                self._drop_segments(older)
                self.snapshot_bytes = size
                self.saved_views = written_views
                self.next_compact = self.compact_bytes
            documents = sum(len(raws) for _, _, _, raws, _ in frozen)
            frozen.clear()
            _give_back_memory()  # the copies and the encoded state, a third of the store's size
            logger.info(
                "wrote a snapshot of the embedded store in %s: %d documents, %d built views, in %.1f s "
                "(of which %.3f s holding the store, to copy what it writes)",
                self.data_dir,
                documents,
                len(written_views),
                time.monotonic() - started + held,
                held,
            )
            return True
        finally:
            self.compacting = False

    def _drop_segments(self, older):
        """Remove the journal segments a snapshot now holds, oldest first
        (what is left after a crash is the newest part of the changes),
        then name the newest `journal.bnj`."""
        try:
            for path in older:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                self.segments.remove(path)
                self.older_bytes = sum(os.path.getsize(p) for p in self.segments[:-1])
            base = os.path.join(self.data_dir, _JOURNAL)
            if self.journal_path != base:
                os.replace(self.journal_path, base)
                self.segments[-1] = self.journal_path = base
            journal.fsync_dir(self.data_dir)
        except OSError as err:
            logger.warning("could not remove the journal compacted into a snapshot in %s (%s)", self.data_dir, err)

    def _compaction_failed(self, err):
        self.next_compact = self.older_bytes + self.journal_size + max(self.compact_bytes // 4, 1 << 20)
        logger.warning(
            "could not compact the embedded store in %s (%s); the journal is kept "
            "as it is and compaction is tried again later",
            self.data_dir,
            err,
        )

    def built_views(self):
        """(database, collection, stages, view) of every built view."""
        out = set()
        for store in self.server_store.collection_stores():
            for prefix, view_set in store.view_sets.items():
                out.update(
                    (store.db_name, store.name, prefix, name)
                    for name, view in view_set.views.items()
                    if view_set.built(view)
                )
        return out

    def close(self):
        """Sync and close the journal. Views built since the last snapshot
        (the first `/stats` after a start builds them: a pass over every
        task) are first written into a new one, so that the next start
        loads them; a compaction that fails here changes nothing."""
        self.closing = True  # no new compaction starts; one under way ends first
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()
        with self.lock:
            if self.closed:
                return
            if self.fd is not None and not self.broken and not self.built_views() <= self.saved_views:
                self.compact()
            self.closed = True
            with self.sync_lock:
                if self.fd is not None:
                    with contextlib.suppress(OSError):
                        os.fsync(self.fd)
                    os.close(self.fd)
                    self.fd = None
                    self.synced_seq = self.written_seq
            if self.lock_fd is not None:
                os.close(self.lock_fd)  # releases the flock
                self.lock_fd = None
