"""Who is making the current request, as the auth layer established it.

Kept apart from `auth.py` so that the validator and the state machine can ask
"who is this?" without depending on how tokens are checked. The role names
are `banyan.protocol`'s.
"""

from dataclasses import dataclass
from typing import Optional

from banyan.protocol import ADMIN, WORKER


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


def acts_for(identity, worker):
    """Whether `identity` may act for the registered `worker` (its stored
    document): admins for any, a worker token for the workers it registered."""
    if identity.role == ADMIN:
        return True
    return identity.role == WORKER and (
        (identity.token_id is not None and worker.get("token_id") == identity.token_id)
        or identity.worker_id == worker["_id"]
    )


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
