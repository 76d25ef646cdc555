"""Oversized input against a live server: a 10 MB command, 100,000
continuations, JSON nested 100,000 levels deep and a body over the size
limit are each refused with 413 or 422 and a message, within a generous
timeout, and the server keeps serving (and has lost nothing) afterwards."""

import json

import pytest
from bson import ObjectId
from conftest import LiveServer, TestSession
from harness import record

from banyan import settings

pytestmark = pytest.mark.slow

#: "Quickly": well within this, on a loaded CI machine (not a benchmark).
TIMEOUT = 60


def message(response):
    """The refusal's message (Eve's JSON, or the WSGI server's text for 413)."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    return json.dumps(body.get("_issues") or body.get("_error") or body)


def oversized_requests(task_id):
    ids = [str(ObjectId()) for _ in range(100000)]
    deep_list = "[" * 100000 + "]" * 100000
    deep_object = '{"a":' * 100000 + "1" + "}" * 100000
    return [
        ("10 MB command", "POST", "/tasks", json.dumps({"command": "x" * 10_000_000}), "max length"),
        (
            "10 MB command (list)",
            "POST",
            "/tasks",
            json.dumps({"command": ["sh", "-c", "x" * 10_000_000]}),
            "max length",
        ),
        (
            "100,000 continuations",
            "POST",
            "/tasks",
            json.dumps({"command": "true", "continuations": ids}),
            "max length is 10000",
        ),
        (
            "100,000 continuations added",
            "POST",
            "/tasks/%s/add_continuations" % task_id,
            json.dumps(ids),
            "max length is 10000",
        ),
        (
            "100,000 continuations by PATCH",
            "PATCH",
            "/tasks/%s" % task_id,
            json.dumps({"add_continuations": ids}),
            "max length is 10000",
        ),
        ("deep JSON list", "POST", "/tasks", '{"name": %s}' % deep_list, "nested more than"),
        ("deep JSON object", "PATCH", "/tasks/%s" % task_id, '{"environment": %s}' % deep_object, "nested more than"),
        ("deep JSON to bulk PATCH", "PATCH", "/tasks", deep_list, "nested more than"),
        ("deep JSON to a claim", "POST", "/workers", '{"host": %s}' % deep_list, "nested more than"),
        (
            "body over MAX_CONTENT_LENGTH",
            "POST",
            "/tasks",
            '{"command": "%s"}' % ("x" * (settings.MAX_CONTENT_LENGTH + 1)),
            "",
        ),
    ]


def test_oversized_input_is_refused_and_the_server_keeps_serving(tmp_path):
    server = LiveServer(tmp_path / "server-data").start()
    refused = []
    try:
        http = TestSession()
        task = http.post(server.url + "/tasks", json={"name": "keep", "command": "true"}).json()
        for label, method, path, body, expected in oversized_requests(task["_id"]):
            r = http.request(
                method, server.url + path, data=body, timeout=TIMEOUT, headers={"Content-Type": "application/json"}
            )
            assert r.status_code in (413, 422), (label, r.status_code, r.text[:500])
            assert expected in message(r), (label, message(r)[:500])
            refused.append("%s: %d" % (label, r.status_code))
            # the server still serves, and the task is as it was
            after = http.get(server.url + "/tasks/" + task["_id"], timeout=TIMEOUT)
            assert after.status_code == 200 and after.json()["_etag"] == task["_etag"], (label, after.text[:500])
        total = http.get(server.url + "/tasks", params={"max_results": 1}, timeout=TIMEOUT).json()["_meta"]["total"]
        assert total == 1
        r = http.post(server.url + "/tasks", json={"name": "after", "command": "true"}, timeout=TIMEOUT)
        assert r.status_code == 201
    finally:
        server.stop()
    assert server.server_errors() == []
    record(
        "oversized input",
        load="%d oversized requests" % len(refused),
        faults="; ".join(refused),
        lost=0,
        duplicates="-",
    )
