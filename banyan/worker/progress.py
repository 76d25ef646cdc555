"""Progress reports from inside a task.

A running task appends lines ``"<fraction> <message>"`` to the file named by
``$BANYAN_PROGRESS_FILE``; the worker reads the last complete line and sends
it with its heartbeats. A plain file keeps this usable from any language
(``echo "0.5 half way" >> "$BANYAN_PROGRESS_FILE"``).
"""

import os

__all__ = ["PROGRESS_ENV", "report_progress", "parse_progress_line", "read_last_progress"]

PROGRESS_ENV = "BANYAN_PROGRESS_FILE"

# Only the end of the file matters; a chatty task must not make reads slow.
_READ_TAIL = 4096


def report_progress(fraction, message="", path=None):
    """Append one progress line for the current task (used by `banyan progress`).

    ``fraction`` must be a number in [0, 1]. Raises ValueError for a bad
    fraction and RuntimeError when not run inside a Banyan task.
    """
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"progress fraction {fraction!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError(f"progress fraction {fraction!r} must be between 0 and 1")
    path = path or os.environ.get(PROGRESS_ENV)
    if not path:
        raise RuntimeError(f"${PROGRESS_ENV} is not set: progress can only be reported from inside a Banyan task")
    text = " ".join(str(message or "").split())  # one line, no control whitespace
    line = f"{value:g} {text}".rstrip() + "\n"
    # One write() of a short line in append mode, so concurrent writers don't interleave.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)


def parse_progress_line(line):
    """``"0.5 half way"`` -> ``{"fraction": 0.5, "message": "half way"}``, or None if malformed."""
    head, _, message = line.strip().partition(" ")
    try:
        fraction = float(head)
    except ValueError:
        return None
    if not 0.0 <= fraction <= 1.0:
        return None
    return {"fraction": fraction, "message": message.strip()}


def read_last_progress(path):
    """The last well-formed, complete progress line of ``path``, or None."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _READ_TAIL))
            data = fh.read()
    except OSError:
        return None
    lines = data.decode("utf-8", errors="replace").split("\n")
    # The last element is an unterminated (possibly half-written) line: skip it.
    for line in reversed(lines[:-1]):
        parsed = parse_progress_line(line)
        if parsed is not None:
            return parsed
    return None
