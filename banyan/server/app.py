"""`create_app`: the Eve app for a Banyan server, wired to its store.

Holds no business logic: it builds Eve with Banyan's data layer, validator
and settings, then registers hooks and blueprints.
"""

import copy
import functools
import json
import logging

from eve import Eve
from flask import jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from banyan import settings as default_settings
from banyan.server import (
    actions,
    auth,
    changes,
    claims,
    idempotency,
    limits,
    openapi,
    query,
    refusals,
    site_settings,
    stats,
    store,
    waits,
)
from banyan.server import services as services_module
from banyan.server.claim_waiters import ClaimWaiters
from banyan.server.datalayer import BanyanMongo, StoreDown, StoreFull, store_failure
from banyan.server.hooks import register_hooks
from banyan.server.reaper import Reaper
from banyan.server.states import TaskQueue, TransitionError
from banyan.server.validation import BanyanValidator
from banyan.server.virtual import register_virtual_resources
from banyan.store.errors import StoreUnavailable

log = logging.getLogger(__name__)


def default_config():
    """A fresh copy of `banyan.settings` (Eve mutates DOMAIN in place)."""
    return {k: copy.deepcopy(getattr(default_settings, k)) for k in dir(default_settings) if k.isupper()}


def create_app(client, config=None, site=None):
    """Build the server app on `client`, a MongoClient-shaped store client
    (see `banyan.server.store.connect`). `site` (a site settings file's
    names, `site_settings.load`) applies over the defaults, then `config`
    overrides settings."""
    settings = site_settings.apply(default_config(), site or {})
    settings.update(config or {})
    auth_on = bool(settings.get("AUTH"))
    app = Eve(
        settings=settings,
        data=functools.partial(BanyanMongo, client=client),
        validator=BanyanValidator,
        auth=auth.BanyanTokenAuth if auth_on else None,
    )
    found = services_module.init_app(app)  # app.extensions["banyan"]
    limits.init_app(app)  # JSON nesting depth
    app.before_request(query.check_paging)
    auth.init_app(app, auth_on)
    db = client[app.config["MONGO_DBNAME"]]
    idempotency.init_app(app, db)  # after auth: keys belong to the caller
    found.claim_waiters = ClaimWaiters()
    found.finish_waiters = waits.FinishWaiters()
    found.queue = TaskQueue(db, on_ready=found.claim_waiters.notify, on_finished=found.finish_waiters.notify)
    register_hooks(app, found.queue)
    app.register_blueprint(stats.blueprint)
    register_virtual_resources(app)  # VIRTUAL_RESOURCES endpoints and bulk PATCH /tasks
    claims.init_app(app, db)
    waits.init_app(app)
    actions.init_app(app)
    changes.init_app(app)
    openapi.init_app(app)  # last: it describes every rule registered before it
    # Started by `banyan server` (serve.py); tests call `services(app).reaper.run_once()`.
    found.reaper = Reaper.for_app(app)
    _register_error_handlers(app)
    app.wsgi_app = _durable_answers(app.wsgi_app, client)
    found.queue.upgrade_stored()
    found.queue.resume_cascades()
    return app


def _durable_answers(wsgi_app, client):
    """Each request's writes reach the disk together, before its answer
    leaves (one sync per request on the embedded store; Flask has built the
    whole body by the time `wsgi_app` returns). The status line waits for
    the sync, so a failed sync answers 507/503 instead of what was built."""

    @functools.wraps(wsgi_app)
    def durable(environ, start_response):
        held = []

        def hold(status, headers, exc_info=None):
            held[:] = [status, headers, exc_info]

        try:
            with store.one_sync(client):
                body = wsgi_app(environ, hold)
        except StoreUnavailable as e:
            log.error("%s", e)
            return _error_response(store_failure(e))(environ, start_response)
        start_response(*held)
        return body

    return durable


def _error_response(error):
    """Eve's error shape, built without an app context (also after the request)."""
    body = json.dumps({"_status": "ERR", "_error": {"code": error.code, "message": error.description}})
    return Response(body, status=error.code, mimetype="application/json")


def _register_error_handlers(app):
    """The state machine's refusals answer their 4xx (`refusals`); any
    unexpected error still answers JSON in Eve's shape (and is logged: a 500
    is a bug)."""

    @app.errorhandler(Exception)
    def unexpected(error):
        if isinstance(error, TransitionError):
            return _error_response(refusals.http_error(error))
        if isinstance(error, StoreUnavailable):
            error = store_failure(error)
        if isinstance(error, (StoreFull, StoreDown)):
            log.error("%s", error.description)
            return _error_response(error)
        if isinstance(error, HTTPException):
            return error
        log.exception("unhandled error")
        response = jsonify({"_status": "ERR", "_error": {"code": 500, "message": "internal error: %s" % error}})
        response.status_code = 500
        return response
