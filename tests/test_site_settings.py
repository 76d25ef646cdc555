"""Site settings: a settings file given to `banyan server --settings` adds to
the package's schema, virtual resources and limits with no code change."""

import subprocess
import sys
import textwrap

from conftest import LiveServer

SITE = textwrap.dedent("""
    DOMAIN = {"tasks": {"schema": {
        "labels": {"type": "list", "schema": {"type": "string"}, "default": [], "readonly": True},
    }}}
    VIRTUAL_RESOURCES = {
        "add_labels": {"kind": "append", "target": "labels", "writable_by": ["admin", "user"]},
    }
""")


def test_a_site_settings_file_adds_a_field_and_its_virtual_resource(tmp_path, http):
    settings = tmp_path / "site_settings.py"
    settings.write_text(SITE)
    server = LiveServer(tmp_path / "data", ["--settings", str(settings)]).start()
    try:
        r = http.post(server.url + "/tasks", json={"command": "true"})
        assert r.status_code == 201, r.text
        tid = r.json()["_id"]
        assert http.get(server.url + "/tasks/" + tid).json()["labels"] == []
        # the new endpoint appends (no duplicates), as the package's add_continuations does
        r = http.post(server.url + "/tasks/%s/add_labels" % tid, json=["night", "gpu"])
        assert r.status_code == 200, r.text
        http.post(server.url + "/tasks/%s/add_labels" % tid, json=["night"])
        assert http.get(server.url + "/tasks/" + tid).json()["labels"] == ["night", "gpu"]
        # its values are checked against the new field's schema, and the field
        # itself stays read-only to a plain PATCH
        r = http.post(server.url + "/tasks/%s/add_labels" % tid, json=[42])
        assert r.status_code == 422, r.text
        r = http.patch(server.url + "/tasks/" + tid, json={"labels": ["x"]})
        assert r.status_code == 422, r.text
        assert http.get(server.url + "/tasks/" + tid).json()["labels"] == ["night", "gpu"]
    finally:
        server.stop()
    assert server.server_errors() == []


def test_a_broken_site_settings_file_stops_the_server_with_its_reason(tmp_path):
    settings = tmp_path / "broken.py"
    settings.write_text("VIRTUAL_RESOURCES = [\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "banyan.cli",
            "server",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--settings",
            str(settings),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "broken.py" in result.stderr and "SyntaxError" in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()  # nothing was opened
