"""The output store: each attempt's stdout and stderr, kept after the worker is gone (with a size cap)."""

import base64
import logging

from pymongo.errors import DuplicateKeyError

from banyan.server.states import utcnow

LOGS = "logs"

log = logging.getLogger(__name__)


class LogStore:
    """The `logs` collection: each attempt's stdout and stderr, the last
    `cap` bytes of each. Output that is valid UTF-8 without a NUL character
    is stored as a string (`stdout`); any other is kept byte for byte
    (`stdout_bytes`): no store is handed a string with a NUL
    (`store.nul_path`), and output keeps what the task wrote."""

    def __init__(self, db, cap):
        self.logs = db[LOGS]
        self.cap = cap

    def tail(self, output):
        """The last `cap` bytes of `output`: bytes stay bytes (exact), text
        stays text (cut at a character boundary)."""
        if isinstance(output, bytes):
            return output[-self.cap :] if len(output) > self.cap else output
        data = (output or "").encode("utf-8", errors="replace")
        if len(data) <= self.cap:
            return output or ""
        return data[len(data) - self.cap :].decode("utf-8", errors="ignore")

    @staticmethod
    def _fields(name, output):
        if isinstance(output, str):
            if "\x00" not in output:
                return {name: output}
            output = output.encode("utf-8", errors="surrogatepass")
        if b"\x00" not in output:
            try:
                return {name: output.decode("utf-8")}
            except UnicodeDecodeError:
                pass
        return {name + "_bytes": output}

    #: Fields only live output (sent while the attempt runs) has.
    LIVE_FIELDS = ("stdout_written", "stderr_written", "live")

    def save(self, task_id, attempt, stdout, stderr):
        """Keep an attempt's output (str or bytes), as reported at its end;
        it replaces any live output. An attempt without output stores
        nothing (and reads back as empty)."""
        if not stdout and not stderr:
            return
        unset = {name: "" for name in self.LIVE_FIELDS + ("stdout_bytes", "stderr_bytes")}
        fields = dict(
            self._fields("stdout", self.tail(stdout)),
            **self._fields("stderr", self.tail(stderr)),
            updated=utcnow(),
            final=True,
        )
        for name in fields:
            unset.pop(name, None)
        self.logs.update_one({"task": task_id, "attempt": attempt}, {"$set": fields, "$unset": unset}, upsert=True)

    def save_live(self, task_id, attempt, output):
        """Output of a running attempt, from a heartbeat: the last bytes of
        each stream and how many the task has written in all (so a reader
        can tell what is new). Never overwrites the output reported at the
        attempt's end."""
        fields = {"updated": utcnow(), "live": True}
        unset = {}
        for name in ("stdout", "stderr"):
            data = output.get(name, b"")
            stored = self._fields(name, self.tail(data))
            fields.update(stored)
            other = name + "_bytes" if name in stored else name
            unset[other] = ""
            fields[name + "_written"] = output.get(name + "_written", len(data))
        try:
            self.logs.update_one(
                {"task": task_id, "attempt": attempt, "final": {"$ne": True}},
                {"$set": fields, "$unset": unset},
                upsert=True,
            )
        except DuplicateKeyError:
            pass  # the attempt's end was reported meanwhile: its output stays

    def get(self, task_id, attempt=None):
        query = {"task": task_id}
        if attempt is not None:
            query["attempt"] = attempt
        docs = list(self.logs.find(query).sort("attempt", -1).limit(1))
        return docs[0] if docs else None

    @staticmethod
    def public(doc, name):
        """`{name: text}`, plus `{name}_base64` with the exact bytes when
        they are not UTF-8 (the text then has replacement characters)."""
        raw = doc.get(name + "_bytes")
        if raw is None:
            return {name: doc.get(name) or ""}
        raw = bytes(raw)
        return {name: raw.decode("utf-8", errors="replace"), name + "_base64": base64.b64encode(raw).decode("ascii")}
