"""Who is making the current request, as the auth layer established it.

Kept apart from `auth.py` so that the validator and the state machine can ask
"who is this?" without depending on how tokens are checked.
"""

from dataclasses import dataclass
from typing import Optional

from flask import g, has_request_context

ROLES = ("admin", "user", "worker")


@dataclass(frozen=True)
class Identity:
    role: str
    name: Optional[str] = None
    #: the token's id; the value stored in a task's `owner`
    token_id: Optional[str] = None
    #: the registered worker acting under this token, if any
    worker_id: Optional[object] = None
    host: Optional[str] = None


#: Authentication off (loopback trial): every caller may do everything.
OPEN = Identity(role="admin", name="open")


def current_identity():
    if has_request_context():
        return g.get("banyan_identity", OPEN)
    return OPEN


def set_identity(identity):
    g.banyan_identity = identity
