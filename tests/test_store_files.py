"""The embedded store's files: a failed write changes nothing, damage is
reported (never silently truncated), a torn tail alone is dropped, repair
salvages every valid record. Disk-full cases run on a real, small tmpfs."""

import contextlib
import errno
import logging
import os
import subprocess
import sys

import pytest

from banyan.server.store import EmbeddedClient
from banyan.store import engine, journal
from banyan.store.errors import StoreCorrupt, StoreUnavailable


def _coll(client):
    return client["banyan"]["tasks"]


@contextlib.contextmanager
def small_tmpfs(path, size="4m"):
    """A tmpfs of `size` mounted at `path` (root only), unmounted after."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (%s): disk-full tests need root" % done.stderr.strip())
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path, leave):
    """Fill the filesystem of `path` with one file, leaving about `leave` bytes free."""
    filler = os.path.join(str(path), "filler")
    st = os.statvfs(str(path))
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_changes_nothing_and_the_store_resumes(tmp_path):
    with small_tmpfs(tmp_path / "fs") as fs:
        data = os.path.join(str(fs), "data")
        c = EmbeddedClient(data)
        coll = _coll(c)
        coll.create_index([("state", 1)])
        coll.insert_one({"_id": "kept", "state": "available", "v": 1})
        filler = fill(fs, 64 * 1024)
        acked, refused = [], None
        for i in range(10000):
            try:
                coll.insert_one({"_id": i, "state": "available", "pad": "x" * 1000})
            except StoreUnavailable as e:
                refused = (i, e)
                break
            acked.append(i)
        assert refused is not None, "the disk never filled"
        i, error = refused
        assert error.status == 507 and "out of disk space" in str(error) and "ENOSPC" in str(error)
        # nothing of the failed write is visible, by _id or through an index
        assert coll.find_one({"_id": i}) is None
        assert coll.count_documents({}) == len(acked) + 1
        assert coll.count_documents({"state": "available"}) == len(acked) + 1
        # an update that cannot be journaled is rolled back too
        with pytest.raises(StoreUnavailable):
            coll.update_one({"_id": "kept"}, {"$set": {"state": "running", "pad": "y" * 100000}})
        assert coll.find_one({"_id": "kept"}) == {"_id": "kept", "state": "available", "v": 1}
        assert coll.find_one({"state": "running"}) is None
        with pytest.raises(StoreUnavailable):
            coll.insert_many([{"_id": "m%d" % j, "pad": "z" * 1000} for j in range(200)])
        assert coll.find_one({"_id": "m0"}) is None
        # space back: the store serves again by itself
        os.remove(filler)
        coll.insert_one({"_id": "after", "state": "available"})
        coll.update_one({"_id": "kept"}, {"$set": {"v": 2}})
        c.close()
        c = EmbeddedClient(data)
        coll = _coll(c)
        assert sorted(d["_id"] for d in coll.find({"_id": {"$type": "int"}})) == acked
        assert coll.find_one({"_id": "kept"})["v"] == 2
        assert coll.find_one({"_id": "after"}) is not None
        assert coll.find_one({"_id": "m0"}) is None
        c.close()


def test_start_and_compaction_on_a_full_disk(tmp_path, caplog):
    """Compaction needs room for a snapshot: short of it, the journal is
    kept and the store still opens and serves."""
    with small_tmpfs(tmp_path / "fs") as fs:
        data = os.path.join(str(fs), "data")
        c = EmbeddedClient(data, compact_bytes=200 * 1024)
        coll = _coll(c)
        for i in range(100):
            coll.insert_one({"_id": i, "pad": "x" * 1000})
        filler = fill(fs, 150 * 1024)
        acked = list(range(100))
        with caplog.at_level(logging.WARNING):
            for i in range(100, 400):  # crosses compact_bytes: compaction fails, writes go on
                try:
                    coll.insert_one({"_id": i, "pad": "x" * 1000})
                except StoreUnavailable:
                    break
                acked.append(i)
        assert "could not compact" in caplog.text
        assert not os.path.exists(os.path.join(data, journal.SNAPSHOT + ".tmp"))
        c.close()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            c = EmbeddedClient(data, compact_bytes=200 * 1024)  # start-up compaction fails too; the store opens
        assert "could not compact" in caplog.text
        assert sorted(d["_id"] for d in _coll(c).find()) == acked
        c.close()
        os.remove(filler)
        c = EmbeddedClient(data)
        assert _coll(c).count_documents({}) == len(acked)
        c.close()


@pytest.mark.parametrize("code, status", [(errno.EIO, 503), (errno.EROFS, 503), (errno.ENOSPC, 507)])
def test_a_write_cut_short_is_cut_from_the_journal(tmp_path, monkeypatch, code, status):
    """The OS wrote part of the record, then failed: the part is removed so
    that nothing is ever appended after it."""
    data = str(tmp_path / "data")
    c = EmbeddedClient(data)
    coll = _coll(c)
    coll.insert_one({"_id": 1, "v": 1})
    size = os.path.getsize(os.path.join(data, journal.JOURNAL))
    real = engine._write_all
    sums = [{"$match": {}}, {"$project": {"v": 1}}, {"$group": {"_id": None, "v": {"$sum": "$v"}}}]
    assert [r["v"] for r in coll.aggregate(sums)] == [1]  # the store now keeps each task's rows

    def half_then_fail(fd, record):
        os.write(fd, record[: len(record) // 2])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(engine, "_write_all", half_then_fail)
    with pytest.raises(StoreUnavailable) as failed:
        coll.insert_one({"_id": 2})
    assert failed.value.status == status and errno.errorcode[code] in str(failed.value)
    assert os.path.getsize(os.path.join(data, journal.JOURNAL)) == size
    assert coll.find_one({"_id": 2}) is None
    with pytest.raises(StoreUnavailable):
        coll.update_one({"_id": 1}, {"$set": {"v": 5}})
    assert coll.find_one({"_id": 1}) == {"_id": 1, "v": 1}
    assert [r["v"] for r in coll.aggregate(sums)] == [1]  # nothing of the failed writes, cached or not
    monkeypatch.setattr(engine, "_write_all", real)
    coll.insert_one({"_id": 3})
    c.close()
    c = EmbeddedClient(data)
    assert sorted(d["_id"] for d in _coll(c).find()) == [1, 3]
    assert _coll(c).find_one({"_id": 1}) == {"_id": 1, "v": 1}
    c.close()


def test_a_failed_sync_refuses_every_call_until_reopened(tmp_path, monkeypatch):
    data = str(tmp_path / "data")
    c = EmbeddedClient(data)
    coll = _coll(c)
    coll.insert_one({"_id": 1})

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(engine, "_fdatasync", eio)
    with pytest.raises(StoreUnavailable) as failed:
        coll.insert_one({"_id": 2})
    assert failed.value.status == 503 and "EIO" in str(failed.value)
    with pytest.raises(StoreUnavailable, match="restarted"):
        coll.find_one({"_id": 1})
    c.close()


def _journal_of_records(data, n):
    """A store whose journal holds one record per document 0..n-1 (no
    compaction: it runs only at start)."""
    c = EmbeddedClient(data)
    for i in range(n):
        _coll(c).insert_one({"_id": i, "name": "task %d" % i})
    c.close()
    scan = journal.read(os.path.join(data, journal.JOURNAL))
    assert len(scan.records) == n + 1  # the format record, then one per insert
    return scan


def test_a_flipped_byte_refuses_to_start_and_repair_salvages_the_rest(tmp_path):
    data = str(tmp_path / "data")
    scan = _journal_of_records(data, 100)
    path = os.path.join(data, journal.JOURNAL)
    start, end, actions = scan.records[51]
    damaged_id = actions[0]["docs"][0]["_id"]
    with open(path, "r+b") as f:
        f.seek((start + end) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(StoreCorrupt) as refused:
        EmbeddedClient(data)
    message = str(refused.value)
    assert path in message and "offset %d" % start in message
    assert "banyan store check %s" % data in message and "banyan store repair %s" % data in message
    lines, starts = journal.check(data)
    assert not starts and any("DAMAGED" in line and "offset %d" % start in line for line in lines)
    report = journal.repair(data)
    assert any("salvaged 99 valid records" in line for line in report)
    assert any("could not salvage" in line and "offset %d" % start in line for line in report)
    kept = [name for name in os.listdir(data) if name.startswith(journal.JOURNAL + ".damaged-")]
    assert len(kept) == 1 and os.path.getsize(os.path.join(data, kept[0])) == scan.size
    c = EmbeddedClient(data)
    assert sorted(d["_id"] for d in _coll(c).find()) == sorted(set(range(100)) - {damaged_id})
    c.close()


def test_a_torn_tail_is_dropped_with_a_warning(tmp_path, caplog):
    data = str(tmp_path / "data")
    _journal_of_records(data, 10)
    path = os.path.join(data, journal.JOURNAL)
    size = os.path.getsize(path)
    record = journal.frame([{"o": "p", "d": "banyan", "c": "tasks", "docs": [{"_id": "torn"}]}])
    with open(path, "ab") as f:
        f.write(record[:30])
    lines, starts = journal.check(data)
    assert starts and any("torn tail: 30 bytes at offset %d" % size in line for line in lines)
    with caplog.at_level(logging.WARNING):
        c = EmbeddedClient(data)
    assert "dropped a torn last record, 30 bytes at offset %d" % size in caplog.text
    assert _coll(c).count_documents({}) == 10 and _coll(c).find_one({"_id": "torn"}) is None
    c.close()


def test_a_damaged_snapshot_refuses_to_start(tmp_path):
    data = str(tmp_path / "data")
    _journal_of_records(data, 10)
    EmbeddedClient(data, compact_bytes=1).close()  # start-up compaction: everything in the snapshot
    path = os.path.join(data, journal.SNAPSHOT)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    with pytest.raises(StoreCorrupt, match="snapshot.bnj is damaged"):
        EmbeddedClient(data)
    journal.repair(data)
    c = EmbeddedClient(data)
    assert _coll(c).count_documents({}) == 10
    c.close()


def test_format_1_files_are_read_and_converted(tmp_path):
    """The seed's files have the same records without the format record."""
    data = str(tmp_path / "data")
    os.makedirs(data)
    with open(os.path.join(data, journal.SNAPSHOT), "wb") as f:
        f.write(journal.frame([{"o": "mk", "d": "banyan", "c": "tasks"}]))
        f.write(journal.frame([{"o": "p", "d": "banyan", "c": "tasks", "docs": [{"_id": 1}]}]))
        f.write(journal.frame([{"o": "end"}]))
    with open(os.path.join(data, journal.JOURNAL), "wb") as f:
        f.write(journal.frame([{"o": "p", "d": "banyan", "c": "tasks", "docs": [{"_id": 2}]}]))
    assert journal.read(os.path.join(data, journal.SNAPSHOT)).version == 1
    c = EmbeddedClient(data)
    assert sorted(d["_id"] for d in _coll(c).find()) == [1, 2]
    c.close()
    assert journal.read(os.path.join(data, journal.SNAPSHOT)).version == 2
    with open(os.path.join(data, journal.JOURNAL), "wb") as f:
        f.write(journal.frame([{"o": "format", "v": 3}]))
    with pytest.raises(StoreCorrupt, match="format 3, newer"):
        EmbeddedClient(data)


def test_store_check_and_repair_commands(tmp_path):
    data = str(tmp_path / "data")
    scan = _journal_of_records(data, 20)
    banyan = [sys.executable, "-m", "banyan.cli", "store"]
    ok = subprocess.run(banyan + ["check", data], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "opens cleanly" in ok.stdout
    start = scan.records[5][0]
    with open(os.path.join(data, journal.JOURNAL), "r+b") as f:
        f.seek(start + journal.HEADER.size + 3)
        f.write(b"\xff\xff")
    bad = subprocess.run(banyan + ["check", data], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout and "offset %d" % start in bad.stdout
    with journal.locked(data):  # as a running server does
        busy = subprocess.run(banyan + ["repair", data], capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and "in use" in busy.stderr
    fixed = subprocess.run(banyan + ["repair", data], capture_output=True, text=True, timeout=60)
    assert fixed.returncode == 0, fixed.stderr
    assert "salvaged 19 valid records" in fixed.stdout and "could not salvage" in fixed.stdout
    again = subprocess.run(banyan + ["check", data], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0
