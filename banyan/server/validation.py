"""`BanyanValidator`: Eve's validator plus Banyan's rules.

One `_validate_<rule>` per rule, each docstring the schema of its argument,
each error naming the offending value (Eve's own style).
"""

import bson
from bson import ObjectId
from cerberus.schema import DefinitionSchema
from eve.io.mongo import Validator
from flask import current_app as app

from banyan.server import auth, states, virtual
from banyan.server.identity import current_identity
from banyan.server.refusals import refuse
from banyan.server.services import services
from banyan.server.store import NUL_REFUSED, find_in, nul_path
from banyan.units import parse_size

#: The largest task a client may store, in BSON bytes: MongoDB refuses
#: documents over 16 MiB, and a task keeps growing by its attempts.
MAX_DOCUMENT_BYTES = 15 * 1024 * 1024

# Checked schemas by the id of the dict Eve passes (the dict is kept, so its
# id cannot be reused): Eve builds a validator per request, and Cerberus
# would expand and re-check the whole schema each time.
_DEFINITIONS = {}


class BanyanValidator(Validator):
    @property
    def schema(self):
        return self._schema

    @schema.setter
    def schema(self, schema):
        if isinstance(schema, dict) and not self.is_child:
            entry = _DEFINITIONS.get(id(schema))
            if entry is None or entry[0] is not schema:
                if len(_DEFINITIONS) > 256:
                    _DEFINITIONS.clear()
                entry = _DEFINITIONS[id(schema)] = (schema, DefinitionSchema(self, schema))
            schema = entry[1]
        Validator.schema.fset(self, schema)

    def _BareValidator__normalize_mapping(self, mapping, schema):
        """Cerberus' normalization copies the schema and re-assigns every
        field's rules, and each assignment re-validates and re-hashes the
        schema: nine tenths of a POST's time. Our schemas hold rules, never
        names of registered rule sets, so that resolving step changes
        nothing and is skipped; any other schema takes Cerberus' own path."""
        if isinstance(schema, str) or any(isinstance(rules, str) for rules in schema.values()):
            return super()._BareValidator__normalize_mapping(mapping, schema)
        self._BareValidator__normalize_rename_fields(mapping, schema)
        if self.purge_unknown and not self.allow_unknown:
            self._normalize_purge_unknown(mapping, schema)
        if self.purge_readonly:
            self._BareValidator__normalize_purge_readonly(mapping, schema)
        self._BareValidator__validate_readonly_fields(mapping, schema)
        self._BareValidator__normalize_default_fields(mapping, schema)
        self._normalize_coerce(mapping, schema)
        self._BareValidator__normalize_containers(mapping, schema)
        self._is_normalized = True
        return mapping

    def validate(self, document, schema=None, update=False, normalize=True):
        return self._fits(super().validate(document, schema, update, normalize), update)

    def _fits(self, ok, update):
        """After Cerberus' validation: no string holding a NUL character
        (`store.nul_path`), and the size of the document as it would be
        stored (for a PATCH, merged with the stored one)."""
        if ok and not self.is_child and isinstance(self.document, dict):
            path = nul_path(self.document)
            if path is not None:
                self._error(path.split(".")[0], "%s %s" % (path, NUL_REFUSED))
                return False
            stored = dict(self.persisted_document or {}, **self.document) if update else self.document
            try:
                size = len(bson.encode(stored))
            except (bson.errors.InvalidDocument, TypeError, OverflowError):
                return ok  # not BSON as it stands: Eve's own checks and the store answer for it
            if size > MAX_DOCUMENT_BYTES:
                largest = max(self.document, key=lambda k: len(repr(self.document[k])))
                self._error(
                    largest, "makes the task %d bytes; a task may take at most %d (15 MiB)" % (size, MAX_DOCUMENT_BYTES)
                )
                return False
        return ok

    def validate_update(self, document, document_id, persisted_document=None, normalize_document=True):
        # Virtual fields: their roles (403), read-write aliases renamed to their targets.
        document = virtual.prepare_update(self.resource, document)
        # Role rules first, so a forbidden change answers 403 (also for internal PATCHes).
        if self.resource == "tasks":
            try:
                services(app).queue.authorize_update(document, current_identity())
            except states.TransitionError as e:
                refuse(e)
        return self._fits(
            super().validate_update(document, document_id, persisted_document, normalize_document), update=True
        )

    def _validate_maxlength(self, max_length, field, value):
        """{'type': 'integer'}"""
        # An oversized value (100,000 continuations) is refused without
        # looking at each element (`schema`, `data_relation`): put
        # `maxlength` before them in the field's schema.
        if isinstance(value, (str, list, dict)) and len(value) > max_length:
            self._error(field, "max length is %d, not %d" % (max_length, len(value)))
            self._drop_remaining_rules()

    def _validate_above(self, bound, field, value):
        """{'type': 'number'}"""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > bound:
            self._error(field, "must be more than %s, not %r" % (bound, value))

    def _normalize_coerce_bytes(self, value):
        """'512 MiB', '1 GiB', '2GB' or a number -> integer bytes; a bad
        string becomes a 422 coercion error."""
        return parse_size(value)

    def _persisted_state(self):
        return (self.persisted_document or {}).get("state")

    def _check_field_change(self, rule, field, state):
        try:
            states.check_field_change(rule, field, state)
        except states.TransitionError as e:
            self._error(field, str(e))

    def _validate_write_once(self, write_once, field, value):
        """{'type': 'boolean'}"""
        if not (write_once and self.is_update_operation):
            return
        state = self._persisted_state()
        persisted = self.persisted_document or {}
        if field not in persisted and value == self.schema[field].get("default"):
            return  # a field added since the task was stored: its default is what it had
        if value != persisted.get(field):
            self._check_field_change("write_once", field, state)

    def _validate_queued_only(self, queued_only, field, value):
        """{'type': 'boolean'}"""
        if not (queued_only and self.is_update_operation):
            return
        if value != (self.persisted_document or {}).get(field):
            self._check_field_change("queued_only", field, self._persisted_state())

    def _validate_creation_only(self, creation_only, field, value):
        """{'type': 'boolean'}"""
        if not (creation_only and self.is_update_operation):
            return
        if field == "continuations":
            self._error(
                field, "'%s' is set when a task is created; change it with add_%s / remove_%s" % (field, field, field)
            )
        else:
            self._error(field, "'%s' is set when a task is created and cannot change" % field)

    def _validate_transition(self, transition, field, value):
        """{'type': 'boolean'}"""
        if not transition or value not in {s.value for s in states.TaskState}:
            return
        if not self.is_update_operation:
            try:
                states.check_creation_state(value)
            except states.TransitionError as e:
                self._error(field, str(e))
            return
        current = self._persisted_state()
        if value == current:
            return
        try:
            states.check_transition(current, value, current_identity().role)
        except states.TransitionError as e:
            self._error(field, str(e))

    def _validate_virtual(self, name, field, value):
        """{'type': 'string'}"""
        spec = app.config["VIRTUAL_RESOURCES"].get(name)
        if spec is None or spec.get("readonly"):
            return
        if not self.is_update_operation:
            self._error(
                field,
                "'%s' changes an existing %s: PATCH it or POST /%s/<id>/%s"
                % (field, self.resource[:-1], self.resource, field),
            )
            return
        for other, other_spec in virtual.specs(self.resource, virtual.LIST_KINDS).items():
            if other != field and other in self.document and other_spec["target"] == spec["target"]:
                self._error(
                    field,
                    "'%s' and '%s' both change '%s'; send them in separate requests" % (field, other, spec["target"]),
                )

    def _validate_writable_by(self, roles, field, value):
        """{'type': 'list', 'schema': {'type': 'string', 'allowed': ['admin', 'user', 'worker']}}"""
        role = current_identity().role
        if role not in roles:
            self._error(field, "'%s' may be set only by %s, not by a %s" % (field, " or ".join(roles), role))

    def _validate_data_relation(self, data_relation, field, value):
        """{'type': 'dict',
        'schema': {
           'resource': {'type': 'string', 'required': True},
           'field': {'type': 'string', 'required': True},
           'embeddable': {'type': 'boolean', 'default': False},
           'version': {'type': 'boolean', 'default': False},
           'continuation': {'type': 'boolean'}
        }}"""
        if data_relation.get("version"):
            return super()._validate_data_relation(data_relation, field, value)
        if value is None:
            return
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, ObjectId) for v in values):
            return  # type errors are reported by the type rule
        related = self.related_documents(data_relation["resource"], data_relation["field"], values)
        # One error per rule, naming the first offending values: one error
        # per value costs Cerberus quadratic time on a long list.
        missing = [v for v in values if v not in related]
        if missing:
            self._error(
                field,
                "value%s %s must exist in resource '%s', field '%s'."
                % ("s" if len(missing) > 1 else "", _first(missing), data_relation["resource"], data_relation["field"]),
            )
        required = states.CONTINUATION_STATE.value if data_relation.get("continuation") else None
        wrong = [v for v in values if v in related and required and related[v].get("state") != required]
        if wrong:
            self._error(
                field,
                "%s must be '%s' (%s)"
                % (
                    _first(wrong),
                    required,
                    ", ".join("'%s' is '%s'" % (v, related[v].get("state")) for v in wrong[:5]),
                ),
            )

    @staticmethod
    def related_documents(resource, key, values):
        """The documents of `resource` whose `key` is in `values` (`store.find_in`)."""
        datasource = app.config["SOURCES"][resource]["source"]
        coll = app.data.driver.db[datasource]
        # a user may relate only to their own tasks and jobs
        own = auth.owner_filter(resource) if resource in ("tasks", "jobs") else {}
        return {d[key]: d for d in find_in(coll, key, values, own, {key: 1, "state": 1})}


def _first(values, count=5):
    """'a', 'b' and 3 more: the first `count` of `values`, quoted."""
    text = ", ".join("'%s'" % v for v in values[:count])
    return text + (" and %d more" % (len(values) - count) if len(values) > count else "")
