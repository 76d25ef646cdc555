"""Tokens, roles and who may do what.

Three roles: `admin` (everything), `user` (creates tasks; reads, changes
and cancels its own), `worker` (reads tasks, claims them, reports attempts;
never creates or cancels them). A fourth, `attempt`, is never made by hand:
a claim makes one token per attempt it hands out (`BANYAN_TOKEN` in the
task's environment), which may read the tasks of that task's job and add
tasks to the job (`ATTEMPT_ROUTES`), and dies with the attempt: it is
deleted when the attempt's report arrives, and refused as soon as the task
no longer runs that attempt (cancelled, abandoned, given back), whatever
path ended it. A request names its token with
`Authorization: Bearer <token>` or with HTTP Basic carrying the token as
user name (`curl -u TOKEN: ...`).

Tokens are stored only as a SHA-256 hash. A token is 256 random bits, so
its hash cannot be reversed or brute-forced; slow password hashes (scrypt,
bcrypt, argon2) exist to protect low-entropy passwords and would cost tens
of milliseconds on every request for no gain here. A token is found by an
indexed equality lookup on its hash, so no stored secret is ever compared
byte by byte (no timing oracle), and a revocation takes effect on the next
request (nothing is cached).

A user's tasks carry the user's name in `owner`. Eve's `auth_field`
(`owner`, see `settings.py`) adds `owner == <name>` to every read and write
a user makes through Eve, so no `where` or projection reaches another
user's task; admins and workers are not restricted. Blueprint views use
`require_role(...)` and, for raw queries, `owner_filter()`.

`TokenStore` works on a database handle alone (no Flask), so that
`banyan token create` can make the first admin token before any server runs.
"""

import hashlib
import json
import logging
import os
import re
import secrets
from functools import wraps

from bson import ObjectId
from bson.errors import InvalidId
from eve.auth import TokenAuth
from flask import Blueprint, abort, current_app, g, request
from pymongo import ReturnDocument

from banyan.protocol import ATTEMPT_ROLE, ROLES
from banyan.server.identity import Identity, current_identity, set_identity
from banyan.server.services import services
from banyan.server.states import HELD, utcnow
from banyan.server.store import nul_path

log = logging.getLogger(__name__)

#: The raw collection that holds tokens (not an Eve resource: no URL of its own).
TOKENS = "tokens"
#: Lets people (and secret scanners) recognise a Banyan token.
TOKEN_PREFIX = "byn_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")

#: Authentication on, no valid token: no role, so every rule refuses.
ANONYMOUS = Identity(role="anonymous")

#: What an attempt token may ask: (method, path pattern). Reads are confined
#: to its job (`owner_filter`, `confine_attempt_reads`), additions to it
#: (`TaskQueue.prepare_new`).
ATTEMPT_ROUTES = [
    (method, re.compile(pattern + r"/?\Z"))
    for method, pattern in (
        ("GET", r"/tasks"),
        ("POST", r"/tasks"),
        ("GET", r"/tasks/[0-9a-f]{24}"),
        ("GET", r"/tasks/[0-9a-f]{24}/logs"),
        ("POST", r"/tasks/wait"),
        ("GET", r"/jobs/[0-9a-f]{24}"),
    )
]


class TokenError(Exception):
    """A refused token operation (`status` is the HTTP code for it)."""

    def __init__(self, message, status=422):
        super().__init__(message)
        self.status = status


def hash_token(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token():
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def public(doc):
    """A token document as shown to people: never its hash."""
    return {
        "_id": str(doc["_id"]),
        "role": doc["role"],
        "name": doc["name"],
        "created": doc.get("created"),
        "revoked": doc.get("revoked"),
    }


class TokenStore:
    """Create, find, list and revoke tokens in `db[TOKENS]`."""

    def __init__(self, db):
        self.tokens = db[TOKENS]
        self.tasks = db["tasks"]
        self.tokens.create_index("hash", unique=True)
        self.tokens.create_index("task", sparse=True)

    def create(self, role, name=None, token=None):
        """Make a token; returns (its public document, the token). The token
        itself is returned only here and stored nowhere. `token` provisions a
        secret made elsewhere (a site's secret store, a test suite) instead
        of a new one."""
        if role not in ROLES:
            raise TokenError("role must be one of %s, not %r" % (", ".join(ROLES), role))
        _id = ObjectId()
        if name is None:
            name = "%s-%s" % (role, str(_id)[-6:])
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise TokenError(
                "a token name is 1 to 128 letters, digits or _.@+- (starting with a letter or digit), not %r" % (name,)
            )
        other = self.tokens.find_one({"name": name, "revoked": None, "role": {"$ne": role}}, {"role": 1})
        if other is not None:
            raise TokenError(
                "the name %r already belongs to a %s; pick another name" % (name, other["role"]), status=409
            )
        if token is None:
            token = new_token()
        elif not (isinstance(token, str) and token.startswith(TOKEN_PREFIX) and 16 <= len(token) <= 512):
            raise TokenError("a provisioned token starts with %r and is 16 to 512 characters" % TOKEN_PREFIX)
        doc = {"_id": _id, "hash": hash_token(token), "role": role, "name": name, "created": utcnow(), "revoked": None}
        self.tokens.insert_one(doc)
        log.info("created %s token %s (%s)", role, name, _id)
        return public(doc), token

    def create_attempt_tokens(self, tasks):
        """A token for the current attempt of each of `tasks` (as claimed):
        {task id: token}. Role `attempt`, stored hashed with the task, its
        attempt number, its job and its owner (one insert for them all)."""
        docs, tokens, now = [], {}, utcnow()
        for task in tasks:
            attempt = task["history"][-1]["attempt"]
            token = new_token()
            tokens[task["_id"]] = token
            docs.append(
                {
                    "_id": ObjectId(),
                    "hash": hash_token(token),
                    "role": ATTEMPT_ROLE,
                    "name": "attempt-%s-%d" % (task["_id"], attempt),
                    "created": now,
                    "revoked": None,
                    "task": task["_id"],
                    "attempt": attempt,
                    "job": task.get("job"),
                    "owner": task.get("owner"),
                }
            )
        if docs:
            self.tokens.insert_many(docs)
        return tokens

    def revoke_attempt(self, task_id, attempt=None):
        """Delete the tokens of `task_id`'s attempt `attempt` (of all its
        attempts when None): an ended attempt's token is worth nothing."""
        query = {"task": task_id, "role": ATTEMPT_ROLE}
        if attempt is not None:
            query["attempt"] = attempt
        self.tokens.delete_many(query)

    def attempt_running(self, doc):
        """Whether the attempt an attempt token was made for still runs."""
        return (
            self.tasks.find_one(
                {
                    "_id": doc.get("task"),
                    "state": {"$in": [s.value for s in HELD]},
                    "history": {"$size": doc.get("attempt")},
                },
                {"_id": 1},
            )
            is not None
        )

    def lookup(self, token):
        """The live (not revoked) token document for `token`, or None."""
        if not token or not isinstance(token, str) or len(token) > 512:
            return None
        return self.tokens.find_one({"hash": hash_token(token), "revoked": None})

    def find(self, id_or_name):
        """Token documents matching an id or, failing that, a name."""
        try:
            doc = self.tokens.find_one({"_id": ObjectId(id_or_name)})
        except (InvalidId, TypeError):
            doc = None
        if doc is not None:
            return [doc]
        if nul_path(id_or_name) is not None:
            return []  # no name holds a NUL (NAME_RE), and no store is asked to match one
        return list(self.tokens.find({"name": id_or_name}))

    def revoke(self, id_or_name):
        """Revoke a token by id, or every live token of a name. Returns the
        public documents revoked; TokenError(404) if nothing matched."""
        docs = self.find(id_or_name)
        if not docs:
            raise TokenError("no token has the id or name %r" % (id_or_name,), status=404)
        revoked = []
        for doc in docs:
            done = self.tokens.find_one_and_update(
                {"_id": doc["_id"], "revoked": None},
                {"$set": {"revoked": utcnow()}},
                return_document=ReturnDocument.AFTER,
            )
            if done is not None:
                revoked.append(public(done))
        if not revoked:
            raise TokenError("token %r is already revoked" % (id_or_name,), status=409)
        return revoked

    def list(self, include_revoked=False):
        query = {"role": {"$ne": ATTEMPT_ROLE}}  # one per running attempt: not people's tokens
        if not include_revoked:
            query["revoked"] = None
        return [public(d) for d in self.tokens.find(query, {"hash": 0}).sort("created", 1)]

    def has_admin(self):
        return self.tokens.find_one({"role": "admin", "revoked": None}, {"_id": 1}) is not None

    def bootstrap_admin(self, path):
        """First start with authentication on: when no live admin token
        exists, make one and write it to `path` (mode 0600). Returns the path
        written, or None when an admin token already exists."""
        if self.has_admin():
            return None
        _, token = self.create("admin", "admin-%s" % secrets.token_hex(3))
        write_secret(path, token)
        return path


def write_secret(path, text):
    """Write a token to a file only its owner can read (mode 0600 from the start)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


# -- requests ---------------------------------------------------------------


def request_token():
    """The token a request carries: Bearer/Token, or HTTP Basic with the token
    as user name (or as password when the user name is empty)."""
    auth = request.authorization
    if auth is None:
        return None
    if auth.type == "basic":
        return auth.username or auth.password or None
    return auth.token or None


class BanyanTokenAuth(TokenAuth):
    """Eve's TokenAuth over `TokenStore`: sets the request's `Identity`
    (see `identity.py`) and, for users, Eve's request auth value, so that
    `auth_field` confines them to their own tasks."""

    def store(self):
        return services().tokens

    def identify(self):
        """The caller's Identity, or None without a valid token. Looked up
        once per request; sets the identity either way (ANONYMOUS if none)."""
        if "banyan_auth_done" in g:
            identity = current_identity()
            return None if identity is ANONYMOUS else identity
        g.banyan_auth_done = True
        token = request_token()
        doc = self.store().lookup(token) if token else None
        if doc is None:
            set_identity(ANONYMOUS)
            return None
        if doc["role"] == ATTEMPT_ROLE:
            return self._identify_attempt(doc)
        identity = Identity(role=doc["role"], name=doc["name"], token_id=str(doc["_id"]))
        set_identity(identity)
        self.set_user_or_token(identity.name)
        if identity.role == "user":
            self.set_request_auth_value(identity.name)
        return identity

    def _identify_attempt(self, doc):
        """An attempt token: valid while its attempt runs (401 after), and
        only for `ATTEMPT_ROUTES` (403). Acts as the task's owner, within
        the task's job."""
        store = self.store()
        if not store.attempt_running(doc):
            store.revoke_attempt(doc.get("task"), doc.get("attempt"))
            set_identity(ANONYMOUS)
            abort(
                401,
                description="this token was made for attempt %s of task '%s', which has ended; it is "
                "no longer valid" % (doc.get("attempt"), doc.get("task")),
            )
        identity = Identity(
            role=ATTEMPT_ROLE,
            name=doc.get("owner"),
            token_id=str(doc["_id"]),
            task_id=doc.get("task"),
            attempt=doc.get("attempt"),
            job_id=doc.get("job"),
        )
        set_identity(identity)
        self.set_user_or_token(doc["name"])
        if identity.name:
            self.set_request_auth_value(identity.name)
        if not any(method == request.method and pattern.search(request.path) for method, pattern in ATTEMPT_ROUTES):
            abort(
                403,
                description="an attempt token (task '%s') may only read the tasks of its job and add "
                "tasks to it, not %s %s" % (identity.task_id, request.method, request.path),
            )
        return identity

    def check_auth(self, token, allowed_roles, resource, method):
        """Eve's hook. A valid token of a role not allowed here answers 403
        (the caller is known, just not permitted), not 401."""
        identity = self.identify()
        if identity is None:
            return False
        if allowed_roles and identity.role not in allowed_roles:
            abort(
                403,
                description="a %s token may not %s %s (allowed: %s)"
                % (identity.role, method, resource or request.path, ", ".join(sorted(set(allowed_roles)))),
            )
        return True

    def authorized(self, allowed_roles, resource, method):
        return self.check_auth(request_token(), allowed_roles, resource, method)

    def authenticate(self):
        abort(
            401,
            description=(
                "authentication required: send a token with 'Authorization: Bearer <token>' "
                "(or curl -u TOKEN:); an admin makes tokens with 'banyan token create'"
            ),
            # Eve's error handler adds this (name, value) pair as a header.
            www_authenticate=("WWW-Authenticate", 'Bearer realm="banyan", Basic realm="banyan"'),
        )


def check_role(roles=()):
    """Authenticate the current request (if not done yet) and require one of
    `roles` (any role when empty). Aborts 401 without a valid token, 403 for
    another role. Returns the Identity. With authentication off, everyone is
    an admin."""
    auth = current_app.auth
    if auth is None:
        return current_identity()
    identity = auth.identify()
    if identity is None:
        auth.authenticate()
    if roles and identity.role not in roles:
        abort(403, description="this needs a %s token, not a %s token" % (" or ".join(roles), identity.role))
    return identity


def require_role(*roles):
    """Decorator for blueprint views: `@require_role("worker", "admin")`."""

    def decorator(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            check_role(roles)
            return view(*args, **kwargs)

        return wrapper

    return decorator


def owner_filter(resource="tasks"):
    """The filter that confines raw task (or job) queries to what the caller
    may see: a user's own; an attempt token's job; everything for admins
    and workers."""
    identity = current_identity()
    if identity.role == "user":
        return {"owner": identity.name}
    if identity.role == ATTEMPT_ROLE:
        return {"job" if resource == "tasks" else "_id": identity.job_id}
    if identity.role in ("admin", "worker"):
        return {}
    return {"_id": None}  # no role: nothing


# -- the admin endpoint -----------------------------------------------------

blueprint = Blueprint("tokens", __name__)


def _reply(body, status=200):
    """JSON with dates in the server's DATE_FORMAT (ISO 8601), as every other
    answer has them (Flask's `jsonify` would write RFC 1123)."""
    response = current_app.response_class(
        json.dumps(body, cls=current_app.data.json_encoder_class), status=status, mimetype="application/json"
    )
    return response


def _store():
    return services().tokens


@blueprint.route("/tokens", methods=["GET"])
@require_role("admin")
def list_tokens():
    """`GET /tokens[?revoked=1]`: tokens without their hashes."""
    include = request.args.get("revoked", "").lower() in ("1", "true", "yes")
    return _reply({"_items": _store().list(include_revoked=include)})


@blueprint.route("/tokens", methods=["POST"])
@require_role("admin")
def create_token():
    """`POST /tokens {"role": ..., "name": ...}` -> 201 with `token`, shown only here."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, description='send a JSON object: {"role": "user", "name": "alice"}')
    unknown = set(body) - {"role", "name"}
    if unknown:
        abort(422, description="unknown field(s): %s" % ", ".join(sorted(unknown)))
    try:
        doc, token = _store().create(body.get("role"), body.get("name"))
    except TokenError as e:
        abort(e.status, description=str(e))
    return _reply(dict(doc, token=token, _status="OK"), 201)


@blueprint.route("/tokens/<id_or_name>", methods=["DELETE"])
@require_role("admin")
def revoke_token(id_or_name):
    """`DELETE /tokens/<id or name>`: revoke (kept, marked revoked)."""
    try:
        revoked = _store().revoke(id_or_name)
    except TokenError as e:
        abort(e.status, description=str(e))
    return _reply({"_status": "OK", "_items": revoked})


def init_app(app, enabled):
    """Wire authentication into `app`: the tokens endpoint always; the
    per-request identity when `enabled`."""
    services(app).tokens = TokenStore(app.data.driver.db)  # (makes the unique index on `hash`)
    app.register_blueprint(blueprint)
    if enabled:

        @app.before_request
        def _identify():
            app.auth.identify()

        app.on_pre_GET += confine_attempt_reads


def confine_attempt_reads(resource, request, lookup):
    """Eve reads by an attempt token see its job only: its tasks, or the job itself."""
    identity = current_identity()
    if identity.role != ATTEMPT_ROLE or resource not in ("tasks", "jobs"):
        return
    field = "job" if resource == "tasks" else "_id"
    if field in lookup and str(lookup[field]) != str(identity.job_id):
        abort(404, description="an attempt token reads only its own job '%s'" % identity.job_id)
    lookup[field] = identity.job_id
