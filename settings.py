"""This site's Banyan settings, applied on top of the package's defaults
(`banyan/settings.py`) by `banyan server` (the default when it runs from
this checkout; elsewhere `banyan server --settings PATH`).

Define only what this site changes; every name is optional:
- `DOMAIN`: per resource, `schema` fields to add or redefine (merged field
  by field) and other resource settings (replaced);
- `VIRTUAL_RESOURCES`: entries to add (their endpoints are built as the
  package's are; see docs/API.md);
- a limit of `banyan/settings.py` (e.g. `LOG_CAP`, `CLAIM_MAX_WAIT`),
  replaced. Flags of `banyan server` win over this file.

For example, a `labels` field on tasks and a `POST /tasks/<id>/add_labels`
endpoint that appends to it:

    DOMAIN = {"tasks": {"schema": {
        "labels": {"type": "list", "schema": {"type": "string"}, "default": [], "readonly": True},
    }}}
    VIRTUAL_RESOURCES = {
        "add_labels": {"kind": "append", "target": "labels", "writable_by": ["admin", "user"]},
    }
    LOG_CAP = 4 * 1024 * 1024   # keep the last 4 MiB of each attempt's output
"""
