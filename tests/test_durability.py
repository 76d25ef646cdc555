"""The embedded store keeps every acknowledged write across kill -9."""

import signal

from conftest import LiveServer


def test_acknowledged_posts_survive_sigkill(tmp_path, http):
    server = LiveServer(tmp_path / "data").start()
    sent = {}
    try:
        for i in range(200):
            body = {"name": "t%d" % i, "command": ["echo", str(i)], "priority": i % 7,
                    "requested_resources": {"cores": 0.5, "memory": "%d MiB" % (i + 1)},
                    "environment": {"I": str(i)}, "state": "available" if i % 2 else "inactive"}
            r = http.post(server.url + "/tasks", json=body)
            assert r.status_code == 201, r.text
            sent[r.json()["_id"]] = body
    finally:
        server.kill(signal.SIGKILL)
    server.start()
    try:
        for tid, body in sent.items():
            r = http.get(server.url + "/tasks/" + tid)
            assert r.status_code == 200, (tid, r.text)
            task = r.json()
            i = int(body["name"][1:])
            assert task["name"] == body["name"]
            assert task["command"] == ["echo", str(i)]
            assert task["priority"] == i % 7
            assert task["requested_resources"] == {"cores": 0.5, "memory": (i + 1) * 1024 ** 2, "gpus": 0}
            assert task["environment"] == {"I": str(i)}
            assert task["state"] == body["state"]
        total = http.get(server.url + "/tasks", params={"max_results": 1}).json()["_meta"]["total"]
        assert total == 200
    finally:
        server.stop()
    assert server.server_errors() == []
