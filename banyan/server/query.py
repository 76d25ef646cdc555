"""The query operators a client's `where` may use: one allow-list for every
endpoint that takes a filter (`GET /tasks` and the virtual resources built
on it, bulk endpoints, `/stats`, `/metrics`, `GET /workers`, and so every
client-side filter such as `banyan wait --where`).

Allowed: comparisons, logic, and element and array tests that both MongoDB
and FerretDB run from indexes or a plain scan. Refused, with a 400 naming
the operator:

- `$where`, `$function`, `$accumulator`, `$expr`: run code or aggregation
  expressions on every document (a client could make the server compute
  without bound, and `$expr` reaches fields through paths the owner
  restriction does not see);
- `$regex` (and its `$options`): a pattern can take exponential time on
  the server; match exact values, or `$in` a list of them;
- `$text`, geo operators, `$jsonSchema`, `$comment`, `$bits*`: no index
  for them here, or nothing a task's fields need.

Eve calls `check_filter` (through `BanyanMongo._sanitize`) on each parsed
`where`, so the rule lives here and nowhere else. A string holding a NUL
character is refused too (`store.nul_path`: no store is asked to match one),
and so is what a JSON body may not hold (`limits.check_json_value`: an
integer beyond 64 bits, which MongoDB's driver cannot even send).
"""

import math

from flask import abort, current_app, request

from banyan.server.limits import check_json_value
from banyan.server.store import NUL_REFUSED, nul_path

#: Operators a `where` may contain.
ALLOWED_OPERATORS = frozenset(
    {
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$and",
        "$or",
        "$nor",
        "$not",
        "$exists",
        "$type",
        "$all",
        "$elemMatch",
        "$size",
        "$mod",
    }
)

#: Why some well-known operators are refused (the message names the reason).
REASONS = {
    "$where": "it runs JavaScript on the server",
    "$function": "it runs JavaScript on the server",
    "$accumulator": "it runs JavaScript on the server",
    "$expr": "it evaluates aggregation expressions on every task",
    "$regex": "a pattern can take the server unbounded time; match exact values or use $in",
    "$options": "it belongs to $regex, which is refused",
}


def refused(operator):
    """The 400 message for a refused `operator`."""
    reason = REASONS.get(operator, "it is not one this server runs")
    return "'where' may not use %s: %s. Allowed operators: %s" % (
        operator,
        reason,
        ", ".join(sorted(ALLOWED_OPERATORS)),
    )


def _first_found(spec, look):
    """The first answer but None of `look(key, value)` over the pairs of
    `spec` (a parsed filter), at any depth, in order; or None."""
    if isinstance(spec, dict):
        for key, value in spec.items():
            found = look(key, value) or _first_found(value, look)
            if found:
                return found
    elif isinstance(spec, (list, tuple)):
        for value in spec:
            found = _first_found(value, look)
            if found:
                return found
    return None


def _refused_operator(key, value):
    if isinstance(key, str) and key.startswith("$") and key not in ALLOWED_OPERATORS:
        return key
    return None


def first_refused(spec):
    """The first operator of `spec` (a parsed filter, at any depth) that is
    not allowed, or None."""
    return _first_found(spec, _refused_operator)


def _bad_mod(key, value):
    if key == "$mod" and not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return "'where': $mod takes [divisor, remainder], two numbers, not %r" % (value,)
    return None


def bad_operand(spec):
    """A message for the first operand of `spec` that MongoDB refuses but a
    store may take badly (FerretDB 1.24 drops the connection on a `$mod`
    that is not a list), or None."""
    return _first_found(spec, _bad_mod)


def check_filter(spec):
    """Abort 400 naming the first operator of `spec` that is refused, or
    the first operand no store should see."""
    operator = first_refused(spec)
    if operator is not None:
        abort(400, description=refused(operator))
    message = bad_operand(spec)
    if message is not None:
        abort(400, description=message)
    path = nul_path(spec)
    if path is not None:
        abort(400, description="'where': %s %s" % (path, NUL_REFUSED))
    check_json_value(spec, current_app.config["MAX_JSON_DEPTH"])
    return spec


#: The largest `page` or `max_results` taken (Eve would pass a larger one to
#: the store's `skip`, which holds 64 bits, or fail to make it an integer).
MAX_PAGING = 2**31 - 1


def check_paging():
    """Before any request: `?page=` and `?max_results=` that Eve cannot turn
    into a page (`inf`, `1e400`, 10**30) answer 400 instead of failing
    inside Eve; what Eve reads leniently (`abc`, 0) it still reads so."""
    for name in ("page", "max_results"):
        text = request.args.get(name)
        if text is None:
            continue
        try:
            number = float(text)
        except ValueError:
            continue
        if not math.isfinite(number) or abs(number) > MAX_PAGING:
            abort(400, description="'%s' must be a whole number from 1 to %d, not %r" % (name, MAX_PAGING, text))
