"""An attempt's output through a real worker (issue 21): bytes that are not
text come back byte for byte from the API and `banyan logs`, and what the
worker keeps on its disk stays within its cap however much a task prints."""

import base64
import os
import subprocess
import sys
import threading

import pytest
from test_worker_live import Cluster, wait_for, worker_command  # noqa: F401

BIN = os.path.dirname(sys.executable)
BANYAN = (
    [os.path.join(BIN, "banyan")]
    if os.path.exists(os.path.join(BIN, "banyan"))
    else [sys.executable, "-m", "banyan.cli"]
)

#: Every byte value, a lone continuation byte, an overlong form, and a cut
#: character at the end: nothing here is UTF-8 (nor NUL-free).
BINARY = bytes(range(256)) + b"\x80abc\xc0\xafdef\xe2\x82"


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make():
        made.append(Cluster(tmp_path / "c"))
        return made[-1]

    yield make
    for c in made:
        c.close()
        assert c.server.server_errors() == []


@pytest.mark.slow
def test_binary_output_round_trips_byte_for_byte(cluster, tmp_path):
    c = cluster()
    c.start_worker("alpha", "--cores", "1")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(BINARY)
    text_id, binary_id, nul_id = c.submit(
        [
            {"command": "printf 'caf\\303\\251\\n'; printf 'plain\\n' >&2", "state": "available"},
            {"command": ["sh", "-c", 'cat "$0"; cat "$0" "$0" >&2', str(payload)], "state": "available"},
            # UTF-8 holding NUL characters, which no store is handed as a string
            {"command": "printf 'a\\000b\\n'; printf '\\000' >&2", "state": "available"},
        ]
    )
    c.wait_finished([text_id, binary_id, nul_id])
    text = c.logs_of(text_id)
    assert (text["stdout"], text["stderr"]) == ("café\n", "plain\n") and "stdout_base64" not in text
    logs = c.logs_of(binary_id)
    assert base64.b64decode(logs["stdout_base64"]) == BINARY
    assert base64.b64decode(logs["stderr_base64"]) == BINARY * 2
    assert "\ufffd" in logs["stdout"]  # the text form is for eyes only
    logs = c.logs_of(nul_id)
    assert (logs["stdout"], logs["stderr"]) == ("a\x00b\n", "\x00")
    assert (base64.b64decode(logs["stdout_base64"]), base64.b64decode(logs["stderr_base64"])) == (b"a\x00b\n", b"\x00")
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("BANYAN_TOKEN", "BANYAN_TEST_MONGO_URI") or not k.startswith("BANYAN_")
    }
    env.update(HOME=str(tmp_path), BANYAN_SERVER=c.url)
    shown = subprocess.run(BANYAN + ["logs", binary_id], capture_output=True, env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert (shown.stdout, shown.stderr) == (BINARY, BINARY * 2)
    shown = subprocess.run(BANYAN + ["logs", text_id], capture_output=True, env=env, timeout=60)
    assert (shown.stdout, shown.stderr) == ("café\n".encode(), b"plain\n")
    shown = subprocess.run(BANYAN + ["logs", nul_id], capture_output=True, env=env, timeout=60)
    assert (shown.stdout, shown.stderr) == (b"a\x00b\n", b"\x00")


def _disk_use(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


@pytest.mark.slow
def test_a_task_printing_200_mb_leaves_at_most_the_cap_on_the_workers_disk(cluster, tmp_path):
    cap = 4 * 1024 * 1024
    c = cluster()
    c.start_worker("alpha", "--cores", "1", "--output-cap", str(cap))
    work = tmp_path / "c" / "work" / "alpha"
    most = []
    done = threading.Event()

    def watch():  # the attempt's directory, sampled while the task runs
        while not done.is_set():
            most.append(_disk_use(work))
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        task_id = c.submit(
            {
                "command": "yes 0123456789abcdef | head -c 200000000; printf END; "
                'printf \'to stderr\' >&2; du -sk "$(dirname "$BANYAN_PROGRESS_FILE")" >&2',
                "state": "available",
            }
        )
        [task] = c.wait_finished([task_id], timeout=300)
    finally:
        done.set()
        watcher.join()
    assert task["exit_status"] == "success", task
    logs = c.logs_of(task_id)
    # the server still gets the last MiB of the stream
    assert len(logs["stdout"]) == 1024 * 1024 and logs["stdout"].endswith("END")
    # the task's own look at its attempt directory, once it had printed everything
    seen_by_task = int(logs["stderr"].split("to stderr", 1)[1].split()[0]) * 1024
    block = 64 * 1024  # file systems allocate in blocks
    assert seen_by_task <= cap + block, seen_by_task
    assert max(most) <= cap + block, max(most)
    assert len(most) > 10
