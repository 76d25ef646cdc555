"""Banyan's embedded store as a component of its own.

`journal` holds the on-disk format (checksummed records, the format marker,
reading with corruption detection) and the `check` / `repair` of a data
directory; `errors` what the store raises when it cannot keep its promises;
`cli` the `banyan store ...` commands. The server reaches the store only
through `banyan.server.store.connect` and those errors. (Nothing is imported
here: the `banyan` command loads no store library until it needs one.)
"""
