"""A submission's parents are checked by the client with the rule the
server's cascade uses (`banyan.protocol.edge_satisfied`): a task after a
failed parent is refused before anything is created."""

import pytest
from conftest import TEST_TOKEN

from banyan.client import Client
from banyan.graph import GraphError, check_parents

FREE = {"cores": 8, "memory": 1 << 34, "gpus": 0}


def _ended(http, url, outcome):
    """A task that ran once and ended with `outcome`."""
    tid = http.post(url + "/tasks", json={"command": "x", "state": "available", "max_retries": 0}).json()["_id"]
    wid = http.post(url + "/workers", json={"host": "n1", "resources": FREE}).json()["_id"]
    items = http.post(url + "/workers/%s/claim" % wid, json={"free": FREE, "max_tasks": 1}).json()["_items"]
    assert [t["_id"] for t in items] == [tid]
    r = http.post(
        url + "/tasks/%s/finish" % tid,
        json={"attempt": 1, "outcome": outcome, "exit_code": 0 if outcome == "success" else 1},
    )
    assert r.status_code == 200, r.text
    return tid


def test_parents_that_rule_a_child_out_are_refused_by_kind(live_server, http):
    client = Client(live_server.url, token=TEST_TOKEN)
    failed = _ended(http, live_server.url, "failure")
    with pytest.raises(GraphError, match="ended with failure, so what runs after it would never run"):
        check_parents(client, {"after": [failed]})
    check_parents(client, {"after_failure": [failed], "after_any": [failed]})  # both may still run
    succeeded = _ended(http, live_server.url, "success")
    with pytest.raises(GraphError, match="succeeded, so what runs after its failure would never run"):
        check_parents(client, {"after_failure": [succeeded]})
    check_parents(client, {"after": [succeeded], "after_any": [succeeded]})
