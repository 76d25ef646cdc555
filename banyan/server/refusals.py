"""The one adapter from the state machine's refusals to HTTP.

`banyan.server.states` raises domain errors (`TransitionError` and its
kinds) that say what is wrong; this module alone decides the status each
answers. Views let them propagate (the app's error handler calls
`http_error`); Eve's hooks convert them with `refuse` first, since Eve turns
any other exception raised in `on_update_*` into a 400.
"""

from werkzeug.exceptions import Conflict as HTTPConflict
from werkzeug.exceptions import Forbidden as HTTPForbidden
from werkzeug.exceptions import NotFound as HTTPNotFound
from werkzeug.exceptions import UnprocessableEntity

from banyan.server.states import Conflict, Forbidden, NotFound, TransitionError

#: Most specific first: a refusal answers the status of the first class it is.
_STATUSES = (
    (NotFound, HTTPNotFound),
    (Forbidden, HTTPForbidden),
    (Conflict, HTTPConflict),
    (TransitionError, UnprocessableEntity),
)


def http_error(error):
    """The HTTPException a refusal answers, with its message."""
    for kind, http in _STATUSES:
        if isinstance(error, kind):
            return http(description=str(error))
    raise TypeError("not a refusal of the state machine: %r" % (error,))


def status_of(error):
    """The HTTP status a refusal answers (for per-item results of bulk requests)."""
    return http_error(error).code


def refuse(error):
    """Raise the HTTPException for the refusal `error`."""
    raise http_error(error) from error
