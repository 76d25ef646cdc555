"""Banyan's embedded store as a component of its own.

`journal` holds the on-disk format (checksummed records, the format marker,
reading with corruption detection) and the `check` / `repair` of a data
directory; `engine` the lock, the journaling of each call and compaction;
`adapter` the pymongo-shaped classes over mongomock; `documents` the
documents, kept as BSON; `indexes` and `planning` the secondary indexes and
which one a query reads; `aggregation` and `views` the stages the store runs
itself and the aggregations every write keeps up to date; `state` the
indexes and views a snapshot keeps; `archive` moving
finished tasks out; `errors` what the store raises when it cannot keep its
promises; `cli` the `banyan store ...` commands. The server reaches the store only
through `banyan.server.store.connect` and those errors. (Nothing is imported
here: the `banyan` command loads no store library until it needs one.)
"""
