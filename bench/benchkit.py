"""What several benchmarks do alike: start a server, fill a queue fast,
time threads that run together, stop the processes they started."""

import contextlib
import copy
import os
import re
import signal
import subprocess
import sys
import time

from bson import ObjectId


@contextlib.contextmanager
def banyan_server(data_dir, stop_timeout=120):
    """A `banyan server` (this interpreter's, embedded store in `data_dir`)
    on a free port; yields its URL, then stops its whole session (SIGTERM)."""
    banyan = os.path.join(os.path.dirname(sys.executable), "banyan")
    server = subprocess.Popen(
        [banyan, "server", "--port", "0", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        line = server.stdout.readline().decode()
        match = re.search(r"(http://\S+)", line)
        if not match:
            raise SystemExit("banyan server did not start: %r" % line)
        yield match.group(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=stop_timeout)


def fill_with_copies(db, n, vary):
    """Bring `db.tasks` to `n` tasks: n - 1 copies of the one task in it
    (posted through the API, so it has the server's shape), each with its
    own _id and changed by `vary(doc, i)`, stored in one insert_many (n
    POSTs would take far longer than what is measured)."""
    model = db.tasks.find_one()
    docs = []
    for i in range(n - 1):
        doc = copy.deepcopy(model)
        doc["_id"] = ObjectId()
        vary(doc, i)
        docs.append(doc)
    db.tasks.insert_many(docs)


def timed_threads(threads):
    """Start `threads` together and join them; the seconds until the last ended."""
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def stop_processes(procs, timeout=30):
    """SIGTERM every process of `procs` (in that order), then wait for each,
    killing one that has not exited within `timeout` seconds."""
    procs = list(procs)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
