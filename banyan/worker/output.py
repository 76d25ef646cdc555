"""What an attempt prints, kept on the worker's disk within a cap.

A task's stdout and stderr each reach the worker through a pipe that a
thread of its own drains at once (so the task never blocks on a full pipe)
into at most two files: `stdout` and, once that holds `segment` bytes, the
previous one renamed `stdout.1`. A stream therefore never keeps more than
two segments on disk, however much the task prints, and always at least
its last `segment` bytes: the tail the server keeps (`OUTPUT_LIMIT`) fits
in one segment with the default cap.
"""

import logging
import os
import threading

log = logging.getLogger(__name__)

__all__ = ["RotatingOutput", "DEFAULT_OUTPUT_CAP", "MIN_OUTPUT_CAP"]

#: Bytes of output a worker keeps on disk per attempt (stdout and stderr
#: together), by default; `banyan-worker --output-cap` changes it.
DEFAULT_OUTPUT_CAP = 16 * 1024 * 1024
#: The smallest cap: four segments of 4 KiB.
MIN_OUTPUT_CAP = 16 * 1024
#: Bytes read from a pipe at a time.
CHUNK = 64 * 1024


class RotatingOutput:
    """One stream of one attempt: `path` and `path.1`, each at most `segment`
    bytes. `pump(fd)` (run on its own thread by `drain`) copies a pipe into
    it until the pipe closes; `tail(limit)` reads the last bytes back."""

    def __init__(self, path, segment):
        self.path = path
        self.previous = path + ".1"
        self.segment = max(1, int(segment))
        self.file = open(path, "wb")
        self.size = 0
        self.written = 0  # bytes written in all (what live output is measured by)
        self.thread = None

    def write(self, data):
        total = len(data)
        while data:
            if self.size >= self.segment:
                self._rotate()
            part = data[: self.segment - self.size]
            self.file.write(part)
            self.size += len(part)
            data = data[len(part) :]
        # on disk at once: `tail` reads it back while the task runs (live output)
        self.file.flush()
        self.written += total

    def _rotate(self):
        self.file.close()
        os.replace(self.path, self.previous)
        self.file = open(self.path, "wb")
        self.size = 0

    def drain(self, fd, name):
        """Copy the pipe `fd` into the files on a daemon thread (it owns `fd`)."""
        self.thread = threading.Thread(target=self._pump, args=(fd,), name=name, daemon=True)
        self.thread.start()

    def _pump(self, fd):
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                self.write(data)
        except OSError as exc:  # disk full: keep reading, so that the task never blocks
            log.warning("cannot keep the output in %s: %s", self.path, exc)
            while os.read(fd, CHUNK):
                pass
        finally:
            os.close(fd)
            self.close()

    def close(self):
        try:
            self.file.close()
        except OSError:
            pass

    def wait(self, timeout):
        """Until the pipe was closed and everything read is on disk (False
        if the writer still holds it after `timeout` seconds)."""
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    def tail(self, limit):
        """The last `limit` bytes written."""
        data = b""
        for path in (self.path, self.previous):
            try:
                with open(path, "rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    size = fh.tell()
                    fh.seek(max(0, size - (limit - len(data))))
                    data = fh.read() + data
            except FileNotFoundError:
                continue
            if len(data) >= limit:
                break
        return data[-limit:] if limit else b""
