"""Limits on what a request body may hold.

Size is Flask's `MAX_CONTENT_LENGTH` (and waitress's `max_request_body_size`,
set from it by `serve.py`): a longer body is refused with 413 before it is
read. Nesting is `MAX_JSON_DEPTH`: Python's JSON parser recurses once per
level and so do Eve's serializer and Cerberus, so a deeply nested body would
end in a RecursionError (a 500) or worse; it is refused with 422 instead.

Values must be standard JSON that the store can keep; otherwise 400:
`NaN`, `Infinity` and numbers too large for a float (`1e400`), which a
validator lets through (`NaN < 0` is false) and no query would match again;
integers outside MongoDB's 64 bits; strings with unpaired surrogates
(`"\\ud800"`), which cannot be encoded as UTF-8.

Every JSON body the app reads (Eve's resources and Banyan's own endpoints)
goes through `app.json`, so these checks live there.
"""

import math

from flask import abort, request
from flask.json.provider import DefaultJSONProvider

from banyan.protocol import INT64_MAX, INT64_MIN


def check_json_value(value, max_depth):
    """Walk a parsed JSON value without recursion; abort (4xx) on the first
    thing the API cannot take."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > max_depth:
                abort(422, description="the JSON body is nested more than %d levels deep" % max_depth)
            if isinstance(item, dict):
                stack.extend((key, level) for key in item)
                item = item.values()
            stack.extend((child, level + 1) for child in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                abort(400, description="the JSON body has a string with an unpaired surrogate (%r)" % item[:40])
        elif isinstance(item, int) and not isinstance(item, bool) and not INT64_MIN <= item <= INT64_MAX:
            abort(400, description="the integer %s is too large (at most 64 bits)" % str(item)[:40])


class CheckedJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, refusing what `check_json_value` refuses."""

    def loads(self, s, **kwargs):
        kwargs.setdefault("parse_constant", _refuse_constant)
        kwargs.setdefault("parse_float", _finite_float)
        limit = self._app.config["MAX_JSON_DEPTH"]
        try:
            value = super().loads(s, **kwargs)
        except RecursionError:
            abort(422, description="the JSON body is nested more than %d levels deep" % limit)
        check_json_value(value, limit)
        return value


def _refuse_constant(name):
    abort(400, description="'%s' is not a JSON number (the body must be standard JSON)" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        abort(400, description="the number %s is too large" % text[:40])
    return value


def check_document_body():
    """Before Eve's POST and PATCH: a body that is JSON but no document (a
    number, a string; a list for an item PATCH) answers 400, which Eve
    itself would not (it takes `len()` of a number)."""
    endpoint = request.endpoint or ""
    if not (
        request.method == "POST"
        and endpoint.endswith("|resource")
        or request.method in ("PATCH", "PUT")
        and endpoint.endswith("|item_lookup")
    ):
        return
    body = request.get_json(silent=True)
    if body is None or isinstance(body, dict) or isinstance(body, list) and request.method == "POST":
        return  # a document, a list of them, or nothing Eve will not refuse itself
    shape = "a JSON object, or a list of them" if request.method == "POST" else "a JSON object"
    abort(
        400,
        description="the body of %s %s must be %s, not %s" % (request.method, request.path, shape, type(body).__name__),
    )


def init_app(app):
    app.json = CheckedJSONProvider(app)
    app.before_request(check_document_body)
