"""Numbers in a `where` that no store holds: one answer on every store.

BSON integers hold 64 bits; a client's JSON may carry any integer. MongoDB
and FerretDB cannot be asked to match a larger one (the driver cannot even
encode it), and the embedded store would quietly match nothing, so every
endpoint that takes a filter refuses it with a 400 naming the number, as a
JSON body holding one is, and nothing changes. Runs on the embedded store and, with
BANYAN_TEST_MONGO_URI, on the database.
"""

import json

import pytest
from test_claims import submit

#: Every GET endpoint that takes `where`.
ENDPOINTS = ("/tasks", "/stats", "/workers", "/metrics")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    "where, number",
    [
        ({"priority": 2**63}, 2**63),
        ({"priority": {"$lt": -(2**63) - 1}}, -(2**63) - 1),
        ({"$or": [{"priority": 1}, {"priority": {"$in": [0, 10**30]}}]}, 10**30),
        ({"history": {"$size": 2**64}}, 2**64),
        ({"priority": {"$mod": [2**70, 0]}}, 2**70),
    ],
)
def test_an_integer_beyond_64_bits_in_a_filter_is_refused_naming_it(api, endpoint, where, number):
    (tid,) = submit(api, {"command": "true", "name": "a"})
    before = api.get("/tasks/%s" % tid).json
    r = api.get(endpoint, query_string={"where": json.dumps(where)})
    assert r.status_code == 400, (endpoint, where, r.status_code, r.data[:300])
    message = r.json["_error"]["message"]
    assert str(number) in message and "64 bits" in message, message
    assert api.get("/tasks/%s" % tid).json == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_largest_64_bit_integers_are_matched(api, endpoint):
    submit(api, {"command": "true", "name": "a"})
    field = "resources.cores" if endpoint == "/workers" else "priority"
    for bound in (2**63 - 1, -(2**63)):
        where = {"$or": [{field: {"$lt": bound}}, {field: {"$gte": bound}}]}
        r = api.get(endpoint, query_string={"where": json.dumps(where)})
        assert r.status_code == 200, (endpoint, bound, r.data[:300])
    r = api.get("/tasks", query_string={"where": json.dumps({"priority": {"$lt": 2**63 - 1}})})
    assert r.json["_meta"]["total"] == 1
