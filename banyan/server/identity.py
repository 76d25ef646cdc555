"""Who is making the current request, as the auth layer established it.

Kept apart from `auth.py` so that the validator and the state machine can ask
"who is this?" without depending on how tokens are checked. The role names
are `banyan.protocol`'s.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Identity:
    role: str
    name: Optional[str] = None
    #: the token's id; the value stored in a task's `owner`
    token_id: Optional[str] = None
    #: the registered worker acting under this token, if any
    worker_id: Optional[object] = None
    host: Optional[str] = None
    #: for an attempt token: the task, its attempt and its job
    task_id: Optional[object] = None
    attempt: Optional[int] = None
    job_id: Optional[object] = None


#: Authentication off (loopback trial): every caller may do everything.
OPEN = Identity(role="admin", name="open")


def current_identity():
    from flask import g, has_request_context

    if has_request_context():
        return g.get("banyan_identity", OPEN)
    return OPEN


def set_identity(identity):
    from flask import g

    g.banyan_identity = identity
