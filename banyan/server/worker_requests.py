"""Parsing and answering the worker-facing requests (claims, heartbeats, reports).

Each parser checks one part of a JSON body and records what is wrong in an
`Issues` (field -> message), so one answer names every problem (422).
"""

import base64
import json
import logging
import math
import re

from bson import ObjectId
from bson.errors import InvalidId
from flask import abort, current_app, make_response, request

from banyan.protocol import INT64_MAX, RESOURCES
from banyan.server import states
from banyan.server.store import NUL_REFUSED, nul_path
from banyan.units import parse_size

log = logging.getLogger(__name__)


class Issues(dict):
    def refuse(self):
        if self:
            body = {
                "_status": "ERR",
                "_issues": dict(self),
                "_error": {"code": 422, "message": "; ".join("%s: %s" % kv for kv in self.items())},
            }
            abort(reply(body, 422))


def json_body():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, description="send a JSON object (Content-Type: application/json)")
    return body


def parse_object_id(value, what):
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        abort(404, description="no %s '%s' (not an id)" % (what, value))


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_unknown(body, allowed, issues, prefix=""):
    for key in set(body) - set(allowed):
        issues[prefix + key] = "unknown field"


def parse_resources(value, field, issues):
    """{cores, memory, gpus}: non-negative numbers (memory also '1 GiB')."""
    if not isinstance(value, dict):
        issues[field] = "must be an object {cores, memory, gpus}, not %r" % (value,)
        return None
    check_unknown(value, RESOURCES, issues, field + ".")
    out = {}
    for key in RESOURCES:
        v = value.get(key, 0)
        if key == "memory" and isinstance(v, str):
            try:
                v = parse_size(v)
            except ValueError as e:
                issues[field + ".memory"] = str(e)
                continue
        if not is_number(v) or v < 0:
            issues["%s.%s" % (field, key)] = "must be a number >= 0, not %r" % (v,)
        elif v > INT64_MAX:
            issues["%s.%s" % (field, key)] = "must be at most %d, not %r" % (INT64_MAX, v)
        elif key == "gpus" and v != int(v):
            issues[field + ".gpus"] = "must be a whole number, not %r" % (v,)
        else:
            out[key] = int(v) if key != "cores" or v == int(v) else v
    return out


#: Names of usage figures: stored as field names, so no `.`, `$` or NUL.
USAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def parse_usage(value, field, issues):
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        issues[field] = "must be an object of numbers, not %r" % (value,)
        return None
    bad = [k for k in value if not USAGE_NAME.match(k)]
    if bad:
        issues[field] = "names must be letters, digits and '_' (up to 64, not starting with a digit), not %r" % (
            bad[0],
        )
        return None
    for key, v in value.items():
        if v is not None and (not is_number(v) or v < 0):
            issues["%s.%s" % (field, key)] = "must be a number >= 0, not %r" % (v,)
    return dict(value)


def parse_live_output(value, field, issues):
    """A heartbeat's output of a running attempt: `{"stdout_base64",
    "stderr_base64"` (the last bytes of each stream), `"stdout_written",
    "stderr_written"` (bytes written in all)}`, as bytes and ints; or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        issues[field] = "must be an object {stdout_base64, stderr_base64, stdout_written, stderr_written}"
        return None
    check_unknown(value, ("stdout_base64", "stderr_base64", "stdout_written", "stderr_written"), issues, field + ".")
    output = {}
    for name in ("stdout", "stderr"):
        encoded = value.get(name + "_base64") or ""
        try:
            output[name] = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else None
        except (ValueError, TypeError):
            output[name] = None
        if output[name] is None:
            issues["%s.%s_base64" % (field, name)] = "must be a base64 string"
        output[name + "_written"] = parse_integer(
            value.get(name + "_written", len(output[name] or b"")), "%s.%s_written" % (field, name), issues, 0
        )
    return output


def parse_progress(value, field, issues):
    if value is None:
        return None
    if not isinstance(value, dict):
        issues[field] = "must be {fraction, message}, not %r" % (value,)
        return None
    check_unknown(value, ("fraction", "message"), issues, field + ".")
    fraction, message = value.get("fraction"), value.get("message", "")
    if fraction is not None and (not is_number(fraction) or not 0 <= fraction <= 1):
        issues[field + ".fraction"] = "must be a number from 0 to 1, not %r" % (fraction,)
    if message is not None and not isinstance(message, str):
        issues[field + ".message"] = "must be a string, not %r" % (message,)
    elif nul_path(message) is not None:
        issues[field + ".message"] = NUL_REFUSED
    return {"fraction": fraction, "message": message[:1024] if isinstance(message, str) else ""}


def parse_integer(value, field, issues, low=None, high=None, default=None, nullable=False):
    if value is None and (nullable or default is not None):
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        issues[field] = "must be an integer%s%s, not %r" % (
            "" if low is None else " >= %s" % low,
            "" if high is None else " <= %s" % high,
            value,
        )
        return None
    return value


def parse_output(body, name, issues, prefix=""):
    """A stream of a finish report: `name` (text) or `name_base64` (any
    bytes, base64), not both. Returns str or bytes."""
    text, encoded = body.get(name), body.get(name + "_base64")
    if text and encoded:
        issues[prefix + name] = "send %s or %s_base64, not both" % (name, name)
        return ""
    if encoded:
        if isinstance(encoded, str):
            try:
                return base64.b64decode(encoded, validate=True)
            except ValueError:  # binascii.Error
                pass
        issues[prefix + name + "_base64"] = "must be a base64 string"
        return ""
    if not isinstance(text or "", str):
        issues[prefix + name] = "must be a string"
        return ""
    return text or ""


def render(body):
    return json.dumps(body, cls=current_app.data.json_encoder_class)


def reply(body, status=200):
    response = make_response(render(body), status)
    response.mimetype = "application/json"
    return response


REPORT_FIELDS = ("attempt", "outcome", "exit_code", "stdout", "stderr", "stdout_base64", "stderr_base64", "usage")


def parse_finish_report(body, prefix, issues):
    """The arguments of `finish` from a report's JSON (issues under `prefix`)."""
    check_unknown(body, REPORT_FIELDS, issues, prefix)
    attempt = parse_integer(body.get("attempt"), prefix + "attempt", issues, 1)
    outcome = body.get("outcome")
    if outcome not in states.WORKER_OUTCOMES:
        issues[prefix + "outcome"] = "must be one of %s, not %r" % (", ".join(states.WORKER_OUTCOMES), outcome)
    exit_code = parse_integer(body.get("exit_code"), prefix + "exit_code", issues, nullable=True)
    output = {name: parse_output(body, name, issues, prefix) for name in ("stdout", "stderr")}
    usage = parse_usage(body.get("usage") or None, prefix + "usage", issues)
    return {
        "attempt": attempt,
        "outcome": outcome,
        "exit_code": exit_code,
        "stdout": output["stdout"],
        "stderr": output["stderr"],
        "usage": usage,
    }


def parse_finish_reports(value, issues):
    """`finished` of a claim: [{"task": id, <a finish report>}, ...] -> [(task id, finish arguments)]."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > current_app.config["CLAIM_MAX_TASKS"]:
        issues["finished"] = "must be a list of at most %d reports {task, attempt, outcome, ...}, not %s" % (
            current_app.config["CLAIM_MAX_TASKS"],
            "%d" % len(value) if isinstance(value, list) else repr(value)[:100],
        )
        return []
    reports = []
    for i, entry in enumerate(value):
        prefix = "finished.%d." % i
        if not isinstance(entry, dict):
            issues["finished.%d" % i] = "must be {task, attempt, outcome, ...}, not %r" % (entry,)
            continue
        task = entry.get("task")
        if not isinstance(task, str) or not ObjectId.is_valid(task):
            issues[prefix + "task"] = "'%s' is not a task id" % (task,)
            continue
        fields = {k: v for k, v in entry.items() if k != "task"}
        reports.append((ObjectId(task), parse_finish_report(fields, prefix, issues)))
    return reports
