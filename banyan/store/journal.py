"""The embedded store's files: records, the format marker, damage.

A data directory holds `snapshot.bnj` (the whole store, replaced atomically
by compaction) and `journal.bnj` (the changes since, appended). While a
compaction writes a snapshot, new changes go to a new segment,
`journal.<n>.bnj`; once the snapshot is in place the older segments are
removed, oldest first, and the new one is renamed `journal.bnj`. A start
replays the snapshot, then `journal.bnj`, then the numbered segments in
order: what is left of them after a crash is always the newest part of the
changes, and replaying changes the snapshot holds already is harmless
(each record puts whole documents). All the files are
sequences of records: `b"BJ"`, payload length (u32 LE), CRC32 of the
payload (u32 LE), then the payload, a BSON document `{"a": [action, ...]}`.
Since format 2 the first record of each file is `{"o": "format", "v": 2}`;
format 1 files (the seed's) are the same records without it and are read
as they are (start-up compaction rewrites them in format 2).

A snapshot ends each collection's documents with an optional `state`
record: its indexes and views, and what they were computed from
(`banyan.store.state`); a start that finds it not matching the documents
computes them again.

Reading tells a torn tail (the last record of a crash, cut short: nothing
valid follows it) from damage (a bad record with valid records after it).
The first may be dropped; the second refuses to open (`StoreCorrupt`) until
`repair` has salvaged every valid record.
"""

import contextlib
import os
import re
import struct
import time
import zlib

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

import bson
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from banyan.store.errors import StoreCorrupt

FORMAT_VERSION = 2
SNAPSHOT = "snapshot.bnj"
JOURNAL = "journal.bnj"
LOCKFILE = "LOCK"
_SEGMENT = re.compile(r"journal\.(\d+)\.bnj\Z")
MAGIC = b"BJ"
HEADER = struct.Struct("<2sII")  # magic, payload length, crc32(payload)
CODEC = CodecOptions(document_class=dict, tz_aware=False)
RAW = CodecOptions(document_class=RawBSONDocument)


def frame(actions):
    """One record holding `actions`."""
    payload = bson.encode({"a": actions})
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def frame_pieces(action, field, blob):
    """One record holding `action` with the bytes `blob` (a memoryview
    too) as its last field `field`, as pieces to write one after the
    other: the blob is not copied into the record (a snapshot's state,
    hundreds of megabytes: each copy holds every thread up). The same
    bytes as `frame([dict(action, **{field: bytes(blob)})])`."""
    empty = bson.encode({"a": [dict(action, **{field: b""})]})
    # ... "\x05" field "\x00", length 0 (int32), subtype 0, then the ends
    # of the action, of the array and of the record's document
    if not empty.endswith(b"\x05" + field.encode() + b"\x00" + bytes(8)):
        raise ValueError("the blob must be the action's last field")
    n = len(blob)
    head = bytearray(empty[:-8])
    for offset in (0, 7, 14):  # the lengths of the document, of "a" and of the action
        struct.pack_into("<i", head, offset, struct.unpack_from("<i", head, offset)[0] + n)
    head += struct.pack("<i", n) + b"\x00"
    tail = b"\x00\x00\x00"
    crc = zlib.crc32(tail, zlib.crc32(blob, zlib.crc32(head)))
    return [HEADER.pack(MAGIC, len(head) + n + len(tail), crc), bytes(head), blob, tail]


def segment_name(number):
    """The file name of journal segment `number` (1, 2...)."""
    return "journal.%d.bnj" % number


def segment_number(path):
    """The number of the journal segment at `path` (0: `journal.bnj`)."""
    got = _SEGMENT.match(os.path.basename(path))
    return int(got.group(1)) if got else 0


def journal_names(data_dir):
    """The names of the journal files in `data_dir`, in replay order:
    `journal.bnj` (if any), then the numbered segments."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return []
    numbered = sorted((int(m.group(1)), name) for name in names for m in [_SEGMENT.match(name)] if m)
    return ([JOURNAL] if JOURNAL in names else []) + [name for _, name in numbered]


def format_record():
    """The record that opens every file written in the current format."""
    return frame([{"o": "format", "v": FORMAT_VERSION}])


class Damage:
    """Bytes at `offset` that are not a valid record, and why."""

    def __init__(self, offset, length, reason, records=None):
        self.offset = offset
        self.length = length
        self.reason = reason
        self.records = records  # how many records the bytes held, when known

    def describe(self):
        held = "" if self.records is None else ", %d record%s" % (self.records, "s" * (self.records != 1))
        return "%d bytes at offset %d (%s%s)" % (self.length, self.offset, self.reason, held)


class Scan:
    """A file read record by record.

    records: [(offset, end, actions)] of every valid record, in file order;
    damage: bad bytes followed by valid records; tail: bad bytes up to the
    end of the file (a torn last record) or None; version: the format.
    """

    def __init__(self, path, data):
        self.path = path
        self.size = len(data)
        self.records = []
        self.crcs = []  # the CRC32 of each valid record's payload, as its header holds it
        self.damage = []
        self.tail = None
        pos = 0
        while pos < self.size:
            end, got = _record_at(data, pos)
            if end is not None:
                self.records.append((pos, end, got))
                self.crcs.append(HEADER.unpack_from(data, pos)[2])
                pos = end
                continue
            following = _next_record(data, pos + 1)
            if following is None:
                self.tail = Damage(pos, self.size - pos, got)
                break
            self.damage.append(Damage(pos, following - pos, got, _records_in(data, pos, following)))
            pos = following
        self.version = 1
        if self.records:
            first = self.records[0][2]
            if first and first[0].get("o") == "format":
                self.version = first[0].get("v")
        if not isinstance(self.version, int) or self.version > FORMAT_VERSION:
            raise StoreCorrupt(
                "%s is in store format %r, newer than this Banyan reads (%d): "
                "run a newer Banyan" % (path, self.version, FORMAT_VERSION)
            )

    @property
    def valid_end(self):
        """Where the valid records end (the tail, if any, starts here)."""
        return self.tail.offset if self.tail else self.size

    def actions(self):
        for _, _, actions in self.records:
            for action in actions:
                if action.get("o") != "format":
                    yield action

    def refusal(self, data_dir):
        """The message a damaged file refuses to open with."""
        first = self.damage[0]
        after = sum(1 for r in self.records if r[0] > first.offset)
        return (
            "%s is damaged: %s, with %d valid record%s after it. The store refuses to start "
            "rather than silently drop them. See the damage with `banyan store check %s`, "
            "then salvage every valid record with `banyan store repair %s` (it keeps the "
            "original file)." % (self.path, first.describe(), after, "s" * (after != 1), data_dir, data_dir)
        )


def _record_at(data, pos):
    """(end, actions) of a valid record at `pos`, or (None, why not)."""
    size = len(data)
    if size - pos < HEADER.size:
        return None, "incomplete record header"
    magic, length, crc = HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return None, "no record marker"
    start = pos + HEADER.size
    if start + length > size:
        return None, "record of %d bytes runs past the end of the file" % length
    payload = bytes(data[start : start + length])
    if zlib.crc32(payload) != crc:
        return None, "checksum mismatch"
    try:
        actions = _decode_actions(payload)
    except Exception:  # pylint: disable=broad-except  # any undecodable payload is damage
        return None, "undecodable record"
    if actions is None:
        return None, "record without actions"
    return start + length, actions


def _decode_actions(payload):
    """The actions of a record's payload (None: it holds none). The
    documents of a `p` action stay encoded (RawBSONDocument): the store
    keeps them so, and decoding them only to encode them again made most
    of a restart's time."""
    actions = bson.decode(payload, codec_options=RAW)["a"]
    if not isinstance(actions, list) or not all(isinstance(a, RawBSONDocument) for a in actions):
        return None
    out = []
    for action in actions:
        if action.get("o") == "p" and isinstance(action.get("docs"), list):
            docs = action["docs"]
            if not all(isinstance(d, RawBSONDocument) for d in docs):
                return None
            out.append({"o": "p", "d": action.get("d"), "c": action.get("c"), "docs": docs})
        else:
            out.append(bson.decode(action.raw, codec_options=CODEC))
    return out


def _next_record(data, start):
    """Offset of the first valid record at or after `start`, or None."""
    pos = data.find(MAGIC, start)
    while pos != -1:
        if _record_at(data, pos)[0] is not None:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return None


def _records_in(data, start, end):
    """1 when the bad bytes are exactly one record (its header intact), else None."""
    if end - start >= HEADER.size:
        magic, length, _ = HEADER.unpack_from(data, start)
        if magic == MAGIC and start + HEADER.size + length == end:
            return 1
    return None


def read(path):
    """The Scan of the file at `path`, or None if there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return Scan(path, data)


@contextlib.contextmanager
def locked(data_dir):
    """Hold the data directory's lock (one process at a time), or raise
    RuntimeError naming the directory."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield None
        return
    fd = os.open(os.path.join(data_dir, LOCKFILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise RuntimeError("%s is in use by another Banyan process (a running server?)" % data_dir) from err
        yield fd
    finally:
        os.close(fd)


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without dir fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# `banyan store check` / `banyan store repair`
# ---------------------------------------------------------------------------


def check(data_dir):
    """(report lines, starts): what each file holds, and whether the store
    would open (a torn tail alone does not stop it)."""
    lines, starts = [], True
    for name in [SNAPSHOT, JOURNAL] + [n for n in journal_names(data_dir) if n != JOURNAL]:
        path = os.path.join(data_dir, name)
        scan = read(path)
        if scan is None:
            lines.append("%s: none" % path)
            continue
        lines.append("%s: format %d, %d bytes, %d valid records" % (path, scan.version, scan.size, len(scan.records)))
        for d in scan.damage:
            lines.append("  DAMAGED: %s" % d.describe())
        if scan.tail is not None:
            if name == SNAPSHOT:
                lines.append(
                    "  DAMAGED: %s at the end (a snapshot is written whole, so this is damage)" % scan.tail.describe()
                )
            else:
                lines.append(
                    "  torn tail: %s (dropped at start, as a write cut short by a crash)" % scan.tail.describe()
                )
        if scan.damage or (name == SNAPSHOT and (scan.tail is not None or not _complete(scan))):
            starts = False
        if name == SNAPSHOT and not _complete(scan) and scan.tail is None:
            lines.append("  DAMAGED: the snapshot has no end record (it was cut short)")
    lines.append(
        "the store opens cleanly"
        if starts
        else "the store will refuse to start: run `banyan store repair %s`" % data_dir
    )
    return lines, starts


def _complete(snapshot_scan):
    return any(a.get("o") == "end" for _, _, actions in snapshot_scan.records for a in actions)


def repair(data_dir):
    """Rewrite each damaged file with every valid record it holds, keeping
    the original beside it. Returns report lines."""
    lines = []
    with locked(data_dir):
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for name in [SNAPSHOT] + journal_names(data_dir):
            path = os.path.join(data_dir, name)
            scan = read(path)
            if scan is None:
                continue
            complete = name != SNAPSHOT or _complete(scan)
            if not scan.damage and scan.tail is None and complete:
                lines.append("%s: no damage, left as it is" % path)
                continue
            with open(path, "rb") as f:
                data = f.read()
            kept = path + ".damaged-" + stamp
            tmp = path + ".repair"
            with open(tmp, "wb") as out:
                out.write(format_record())
                for start, end, actions in scan.records:
                    if not (actions and actions[0].get("o") == "format"):
                        out.write(data[start:end])
                if name == SNAPSHOT and not complete:
                    out.write(frame([{"o": "end"}]))
                out.flush()
                os.fsync(out.fileno())
            os.link(path, kept)
            os.replace(tmp, path)
            fsync_dir(data_dir)
            salvaged = sum(1 for r in scan.records if r[2] and r[2][0].get("o") != "format")
            lines.append("%s: salvaged %d valid records; the original is kept as %s" % (path, salvaged, kept))
            for d in scan.damage + ([scan.tail] if scan.tail else []):
                lines.append("  could not salvage %s: the changes it held are lost" % d.describe())
            if not complete:
                lines.append(
                    "  the snapshot had no end record: documents written after its last valid record "
                    "are lost unless the journal holds them"
                )
    return lines
