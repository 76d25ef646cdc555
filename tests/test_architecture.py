"""The code's shape as pyproject.toml's import contracts state it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    """`lint-imports`: the server's layers point one way (views -> services ->
    state machine -> store interface), no package has an import cycle, and
    the client, CLI and worker import nothing of the server."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_command_loads_no_server_framework():
    """`banyan ls` and `banyan --help` start without Eve, Flask, Cerberus or
    pymongo (the server's commands load them when they run)."""
    code = (
        "import sys, banyan.cli; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'eve', 'flask', 'cerberus', 'pymongo', 'mongomock', 'werkzeug'})))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", "banyan.cli loads %s" % result.stdout.strip()
