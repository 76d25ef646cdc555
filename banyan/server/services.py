"""The server's services: one object per app, in `app.extensions["banyan"]`.

Views, hooks and the reaper reach the state machine (`queue`), the worker
registry, the log and token stores and the long-poll tables through
`services()`, not through attributes of the Eve app: any unknown name on
Eve's app is silently a new event slot, while a misspelt service here
raises AttributeError. `create_app` fills it; each `init_app` adds its own.
"""

from flask import current_app

EXTENSION = "banyan"


class Services:
    """What one Banyan app runs on (set once while the app is built)."""

    __slots__ = (
        "queue",
        "workers",
        "logs",
        "tokens",
        "idempotency",
        "claim_waiters",
        "finish_waiters",
        "changes_waiters",
        "reaper",
    )


def services(app=None):
    """The services of `app` (default: the app of the current request)."""
    return (app if app is not None else current_app).extensions[EXTENSION]


def init_app(app):
    """Register an empty `Services` with `app` and return it."""
    app.extensions[EXTENSION] = Services()
    return app.extensions[EXTENSION]
