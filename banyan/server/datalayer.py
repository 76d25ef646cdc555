"""`BanyanMongo`: Eve's Mongo data layer on Banyan's store.

It is handed the store's client (a real MongoClient or the embedded one) and
never asks which. Writes through Eve's PATCH carry the state they started
from as a precondition next to `_etag`, so a lost race matches nothing and
answers 409 instead of being applied or silently dropped.
"""

import functools
import logging

import bson
import pymongo
from eve.auth import auth_field_and_value
from eve.io.mongo import Mongo
from eve.utils import ParsedRequest, config, validate_filters
from flask import abort, g, has_request_context, request
from werkzeug.exceptions import BadRequest, HTTPException

from banyan.protocol import INT64_MAX, INT64_MIN
from banyan.server import query as query_rules
from banyan.server import store, virtual
from banyan.server.services import services
from banyan.store.errors import StoreUnavailable

log = logging.getLogger(__name__)


class _Connection:
    """What Eve expects from `Mongo.pymongo()`: a client and its database."""

    def __init__(self, client, dbname):
        self.cx = client
        self.db = client[dbname]


#: What a store raises for a query it cannot run (the store interface's
#: list); a store that cannot be reached is not the client's fault and
#: stays a 5xx.
QUERY_ERRORS = store.QUERY_ERRORS


class StoreFull(HTTPException):
    """507: the store's disk is full; the write changed nothing."""

    code = 507


class StoreDown(HTTPException):
    """503: the store could not write to its disk; the write changed nothing."""

    code = 503


def store_failure(error):
    """The HTTP answer to a StoreUnavailable, naming its cause."""
    return (StoreFull if error.status == 507 else StoreDown)(description=str(error))


def _answers_store_failures(method):
    """Eve turns any exception of a PATCH or PUT into a 400; a store that
    cannot write is not the client's fault."""

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except StoreUnavailable as e:
            raise store_failure(e) from e

    return guarded


#: What a `where` may be, said when one cannot be parsed.
WHERE_HELP = (
    "'where' is not a filter this server accepts: a JSON object with MongoDB query operators "
    '(such as {"state": {"$in": ["running", "available"]}}; %s), or Eve\'s python '
    'syntax (name=="x")' % ", ".join(sorted(query_rules.ALLOWED_OPERATORS))
)


def _field_path(name):
    return isinstance(name, str) and name != "" and not name.startswith("$") and "" not in name.split(".")


def _check_projection(projection):
    """`?projection=`: field paths to 1 (include) or 0 (exclude), not both
    kinds but for `_id`; what MongoDB accepts beyond that (`$slice`,
    expressions) is refused here with a 400 rather than failing later."""
    bad = [
        k
        for k, v in projection.items()
        if not _field_path(k) or not (isinstance(v, bool) or type(v) is int and v in (0, 1))
    ]
    if bad:
        abort(
            400,
            description="'projection' maps field names to 1 (include) or 0 (exclude), "
            'such as {"name": 1}; not %s: %r' % (bad[0], projection[bad[0]]),
        )
    kinds = {bool(v) for k, v in projection.items() if k != "_id"}
    if len(kinds) > 1:
        abort(400, description="'projection' either includes fields (1) or excludes them (0), not both")


def _check_sort(sort):
    """`?sort=`: [[field, 1 or -1], ...] (or {field: 1 or -1}, or "-a,b")."""
    pairs = list(sort.items()) if isinstance(sort, dict) else sort
    ok = isinstance(pairs, (list, tuple)) and all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and _field_path(p[0])
        and not isinstance(p[1], bool)
        and p[1] in (1, -1)
        for p in pairs
    )
    if not ok:
        abort(400, description='\'sort\' takes [["field", 1 or -1], ...] or "-field,other", not %r' % (sort,))


def _integral(value):
    """Eve's serializer truncates 1.5 to 1; keep non-integral numbers so the
    validator refuses them, and so are those beyond the 64 bits the store
    keeps (1e308)."""
    if isinstance(value, float) and value.is_integer() and INT64_MIN <= value <= INT64_MAX:
        return int(value)
    return value


class BanyanMongo(Mongo):
    serializers = dict(Mongo.serializers, integer=_integral)

    def __init__(self, app, client):
        self.client = client
        super().__init__(app)

    def init_app(self, app):
        super().init_app(app)
        self.connection = _Connection(self.client, app.config["MONGO_DBNAME"])

    def pymongo(self, resource=None, prefix=None):
        self.mongo_prefix = None
        return self.connection

    @_answers_store_failures
    def replace(self, resource, id_, document, original):
        return super().replace(resource, id_, document, original)

    @_answers_store_failures
    def remove(self, resource, lookup):
        return super().remove(resource, lookup)

    @_answers_store_failures
    def update(self, resource, id_, updates, original):
        changes, has_virtual = virtual.update_operators(resource, updates)
        if has_virtual:
            log.debug("virtual write on %s '%s': %s", resource, id_, changes)
        self._guarded_change(resource, id_, changes, original)

    @_answers_store_failures
    def insert(self, resource, doc_or_docs):
        """Eve's insert; a document the store refuses as such (MongoDB's
        DocumentTooLarge) is a 422, and the continuations of the tasks not
        stored stop waiting for them."""
        try:
            return super().insert(resource, doc_or_docs)
        except bson.errors.InvalidDocument as e:
            if resource == "tasks":
                services(self.app).queue.forget_new(doc_or_docs if isinstance(doc_or_docs, list) else [doc_or_docs])
            abort(422, description="the store refused the task: %s" % e)

    def _client_projection(self, req):
        """The client's projection with virtual fields mapped to the stored
        fields they are computed from (`virtual.plan_projection`);
        `g.banyan_forced_projection` stands in for it when a virtual
        resource's GET asks for exactly one alias."""
        projection = g.pop("banyan_forced_projection", None)
        if projection is None:
            projection = super()._client_projection(req)
            _check_projection(projection)
        return projection

    def _convert_sort_request_to_dict(self, req):
        sort = super()._convert_sort_request_to_dict(req)
        _check_sort(sort)
        return sort

    def _sanitize(self, resource, spec):
        """Every parsed `where` passes here: operators outside
        `query.ALLOWED_OPERATORS` answer 400 naming the one refused (Eve's
        own check answers a generic 400 for some and lets `$expr` through)."""
        if not isinstance(spec, dict):
            abort(400, description='\'where\' must be a JSON object, such as {"name": "x"}')
        return query_rules.check_filter(spec)

    def _convert_where_request_to_dict(self, resource, req):
        """Eve's parsing of `where`, with its generic 400 ("the browser sent
        a request this server could not understand") made to say what is
        accepted."""
        try:
            return super()._convert_where_request_to_dict(resource, req)
        except BadRequest as e:
            if e.description != BadRequest.description:
                raise
            abort(400, description=WHERE_HELP)

    def where_filter(self, resource, where):
        """`where` (the query string's text) as a store filter, checked as
        Eve checks it for `GET /<resource>`; for the endpoints Eve does not
        serve (`/stats`, `/metrics`, `/workers`)."""
        if not where:
            return {}
        req = ParsedRequest()
        req.where = where
        query = self._convert_where_request_to_dict(resource, req)
        if not isinstance(query, dict):
            abort(400, description='\'where\' must be a JSON object, such as {"name": "x"}')
        bad = validate_filters(query, resource)
        if bad:
            abort(400, description=bad)
        return self._mongotize(query, resource)

    def find(self, resource, req, sub_resource_lookup, perform_count=True):
        """Eve's find, with a filter the store refuses answered 400: Eve
        counts first and, when the count fails, falls back to a method
        pymongo 4 no longer has (a 500 naming `Collection.count`)."""
        try:
            return super().find(resource, req, sub_resource_lookup, perform_count)
        except QUERY_ERRORS as e:
            cause = e.__context__ if isinstance(e.__context__, QUERY_ERRORS) else e
            abort(400, description="the store refused the filter in 'where': %s" % cause)

    def _datasource_ex(
        self,
        resource,
        query=None,
        client_projection=None,
        client_sort=None,
        check_auth_value=True,
        force_auth_field_projection=False,
    ):
        if client_projection is not None:
            client_projection = virtual.plan_projection(resource, client_projection)
        datasource, query, fields, sort = super()._datasource_ex(
            resource, query, client_projection, client_sort, check_auth_value, force_auth_field_projection
        )
        if check_auth_value and has_request_context() and request.method == "POST":
            # Eve leaves the user's `owner` filter out of every query of a POST
            # (it expects POST to create), but virtual writes (POST
            # /tasks/<id>/rank, ...) read and update existing tasks.
            auth_field, auth_value = auth_field_and_value(resource)
            if auth_field and auth_value:
                own = {auth_field: auth_value}
                query = {"$and": [query, own]} if query else own
        return datasource, query, fields, sort

    def query_contains_field(self, query, field_name):
        """Eve answers 401 ("Incompatible User-Restricted Resource request",
        which reads as a bad token) when a user's `where` names `owner`;
        reporting False makes Eve AND the query with the user's own name
        instead, so it simply matches none of another user's tasks."""
        if any(field_name == r.get("auth_field") for r in config.DOMAIN.values()):
            return False
        return super().query_contains_field(query, field_name)

    def _guarded_change(self, resource, id_, changes, original):
        """Apply `changes` only if the document is still as `original` was
        (same `_etag` and `state`); otherwise 409 and nothing changes."""
        id_field = config.DOMAIN[resource]["id_field"]
        query = {id_field: id_}
        for key in (config.ETAG, "state"):
            if key in original:
                query[key] = original[key]
        datasource, filter_, _, _ = self._datasource_ex(resource, query)
        coll = self.get_collection_with_write_concern(datasource, resource)
        log.debug("update %s: filter %s, changes %s", datasource, filter_, changes)
        try:
            result = coll.update_one(filter_, changes)
        except pymongo.errors.DuplicateKeyError as e:
            abort(409, description="duplicate key: %s" % e)
        except (pymongo.errors.WriteError, pymongo.errors.OperationFailure, bson.errors.InvalidDocument) as e:
            abort(422, description="the store refused the update: %s" % e)
        if result.matched_count == 0:
            current = coll.find_one({id_field: id_}, {"state": 1}) or {}
            abort(
                409,
                description=(
                    "%s '%s' changed while this request was handled (its state is now '%s'); "
                    "read it again and retry" % (resource[:-1], id_, current.get("state"))
                ),
            )
