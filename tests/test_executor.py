"""TaskProcess, hooks and resource sampling against real processes and signals."""

import os
import signal
import sys
import time

import psutil
import pytest
from conftest import killed, wait_for

from banyan.worker import resources
from banyan.worker.executor import Spawner, SupervisorPool, TaskProcess
from banyan.worker.hooks import TaskHook, TimeLimit, run_hooks
from banyan.worker.progress import read_last_progress, report_progress


def make(tmp_path, command, attempt=1, **fields):
    task = {"_id": fields.pop("_id", "t1"), "command": command}
    task.update(fields)
    return TaskProcess(task, attempt, tmp_path / "attempt")


def wait_outcome(proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = proc.poll()
        if outcome is not None:
            return outcome
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("task did not finish")


def group_members(pgid):
    """Live (non-zombie) processes in a process group."""
    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def test_output_goes_to_files_and_tail_returns_the_end(tmp_path):
    proc = make(tmp_path, "echo hello; echo oops >&2; printf 'caf\\303\\251'")
    proc.start()
    assert wait_outcome(proc) == (0, "success")
    assert proc.tail("stdout") == "hello\ncafé"
    assert proc.tail("stderr") == "oops\n"
    assert open(proc.stdout_path).read() == "hello\ncafé"
    assert proc.tail("stdout", limit=3) == "fé"


def test_supervisors_started_ahead_run_attempts_and_leave_when_let_go(tmp_path):
    pool = SupervisorPool(size=2)
    pool.fill()
    deadline = time.monotonic() + 30
    while len(pool.ready_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    idle = pool.ready_pids()
    assert len(idle) == 2 and all(psutil.pid_exists(pid) for pid in idle)
    outcomes = []
    for i, (command, _code) in enumerate([("echo one; echo err >&2", 0), ("echo two; exit 3", 3)]):
        proc = TaskProcess({"_id": "t%d" % i, "command": command}, 1, tmp_path / str(i), supervisors=pool)
        proc.start()
        assert proc.supervisor_pid in idle  # one started ahead, not one of its own
        outcomes.append((wait_outcome(proc).exit_code, proc.tail("stdout"), proc.tail("stderr")))
    assert outcomes == [(0, "one\n", "err\n"), (3, "two\n", "")]
    deadline = time.monotonic() + 30
    while len(pool.ready_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    spare = pool.ready_pids()
    assert len(spare) == 2 and not set(spare) & set(idle)  # taken ones were replaced
    pool.close()
    assert all(killed(pid) for pid in spare)
    assert pool.take() is None  # closed: each attempt starts its own


class RefusesFirst:
    """A real spawner whose first answer is an error no one expected (an
    OSError would only make the pool start an interpreter instead)."""

    def __init__(self):
        self.spawner = Spawner()
        self.refused = 0

    def spawn(self, out_fd, err_fd):
        if not self.refused:
            self.refused += 1
            raise RuntimeError("an answer no one expected")
        return self.spawner.spawn(out_fd, err_fd)


def test_a_pool_whose_supervisor_could_not_start_fills_again_when_an_attempt_takes_one(tmp_path):
    spawner = RefusesFirst()
    pool = SupervisorPool(size=1, spawner=spawner)
    try:
        pool.fill()
        wait_for(lambda: spawner.refused, 30, "the refused start")
        assert pool.take() is None  # nothing ready: this attempt starts its own
        wait_for(lambda: len(pool.ready_pids()) == 1, 30, "the pool to fill again")
        ready = pool.ready_pids()
        proc = TaskProcess({"_id": "t1", "command": "echo ran"}, 1, tmp_path / "a", supervisors=pool)
        proc.start()
        assert proc.supervisor_pid in ready  # the one the pool started after its failure
        assert wait_outcome(proc).exit_code == 0 and proc.tail("stdout") == "ran\n"
    finally:
        pool.close()
        spawner.spawner.close()


def test_tail_keeps_only_the_last_bytes_and_replaces_broken_utf8(tmp_path):
    proc = make(
        tmp_path,
        [sys.executable, "-c", "import sys; sys.stdout.write('x' * 5000 + 'END'); sys.stdout.buffer.write(b'\\xff')"],
    )
    proc.start()
    assert wait_outcome(proc).outcome == "success"
    text = proc.tail("stdout", limit=100)
    assert len(text.encode("utf-8")) <= 100 + 2  # the bad byte becomes U+FFFD
    assert text.endswith("END\ufffd")
    assert len(proc.tail("stdout")) == 5004


def test_environment_and_working_directory_are_applied(tmp_path):
    workdir = tmp_path / "here"
    workdir.mkdir()
    proc = make(
        tmp_path,
        'echo "$GREETING|$BANYAN_TASK_ID|$BANYAN_ATTEMPT|$BANYAN_PROGRESS_FILE|$PATH"; pwd',
        _id="abc123",
        attempt=3,
        environment={"GREETING": "hi there", "NUMBER": 7},
        working_directory=str(workdir),
    )
    proc.start()
    assert wait_outcome(proc).exit_code == 0
    first, second = proc.tail("stdout").splitlines()
    greeting, task_id, attempt, progress, path = first.split("|")
    assert (greeting, task_id, attempt) == ("hi there", "abc123", "3")
    assert progress == proc.progress_path and progress.startswith(str(tmp_path))
    assert path == os.environ["PATH"]  # the worker's environment is inherited
    assert second == str(workdir)


def test_list_commands_are_executed_without_a_shell(tmp_path):
    proc = make(tmp_path, ["echo", "$HOME", "a b"])
    proc.start()
    assert wait_outcome(proc) == (0, "success")
    assert proc.tail("stdout") == "$HOME a b\n"


@pytest.mark.parametrize(
    "command, code, outcome",
    [
        ("exit 0", 0, "success"),
        ("exit 1", 1, "failure"),
        ("exit 42", 42, "failure"),
        ("kill -9 $$", -9, "failure"),
    ],
)
def test_exit_codes_map_to_outcomes(tmp_path, command, code, outcome):
    proc = make(tmp_path, command)
    proc.start()
    assert wait_outcome(proc) == (code, outcome)


def test_a_command_that_cannot_start_is_a_failure_with_a_message(tmp_path):
    proc = make(tmp_path, ["/nonexistent/program"])
    proc.start()
    assert proc.poll() == (None, "failure")
    assert "cannot start" in proc.tail("stderr")
    missing_dir = make(tmp_path, "true", working_directory=str(tmp_path / "missing"))
    missing_dir.start()
    assert missing_dir.poll() == (None, "failure")


def test_a_start_that_does_not_wait_learns_the_pid_from_poll(tmp_path):
    proc = make(tmp_path, "echo out; echo err >&2; exec sleep 60", max_shutdown_time=1)
    proc.start(wait=False)
    deadline = time.monotonic() + 20
    while proc.pid is None and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.02)
    # the task itself: its supervisor's child, leading a session of its own
    assert psutil.Process(proc.pid).ppid() == proc.supervisor_pid and os.getsid(proc.pid) == proc.pid
    assert proc.sample()["max_rss"] > 0
    proc.terminate(1, reason="cancelled")
    assert proc.poll() == (-signal.SIGTERM, "cancelled")
    assert (proc.tail("stdout"), proc.tail("stderr")) == ("out\n", "err\n")


def test_a_start_that_does_not_wait_and_fails_is_a_failure_with_a_message(tmp_path):
    proc = make(tmp_path, ["/nonexistent/program"])
    proc.start(wait=False)
    assert wait_outcome(proc) == (None, "failure")
    assert proc.outputs["stderr"].wait(10)  # nothing holds the stream open any more
    assert "cannot start task t1" in proc.tail("stderr")


def test_terminate_kills_a_group_that_ignores_sigterm(tmp_path):
    # The shell ignores TERM, and so does its child (ignored signals are inherited).
    proc = make(tmp_path, "trap '' TERM; sleep 60 & sleep 60; wait")
    proc.start()
    deadline = time.monotonic() + 10
    while len(group_members(proc.pgid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(group_members(proc.pgid)) >= 3
    proc.terminate(grace=1, reason="cancelled")
    outcome = proc.poll()
    assert outcome == (-signal.SIGKILL, "cancelled")
    deadline = time.monotonic() + 5
    while group_members(proc.pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group_members(proc.pgid) == []


def wait_ready(proc, ready, timeout=10):
    """Wait until the task made `ready` (its trap is set), failing if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the task never set its trap"
        time.sleep(0.02)


def test_terminate_lets_a_cooperative_task_exit_on_sigterm(tmp_path):
    marker, ready = tmp_path / "cleaned", tmp_path / "ready"
    proc = make(tmp_path, f"trap 'echo bye > {marker}; exit 3' TERM; touch {ready}; while true; do sleep 0.05; done")
    proc.start()
    wait_ready(proc, ready)
    proc.terminate(grace=30, reason="cancelled")
    assert proc.poll() == (3, "cancelled")
    assert marker.read_text() == "bye\n"


def test_terminate_without_waiting_escalates_from_poll(tmp_path):
    ready = tmp_path / "ready"
    proc = make(tmp_path, f"trap '' TERM; touch {ready}; sleep 60")
    proc.start()
    wait_ready(proc, ready)
    proc.terminate(grace=1.0, reason="timeout", wait=False)
    # poll() escalates to SIGKILL once the grace has passed; 1 s leaves room for a busy machine
    assert proc.poll() is None
    assert wait_outcome(proc) == (-signal.SIGKILL, "timeout")


def test_terminate_after_exit_keeps_the_real_outcome(tmp_path):
    proc = make(tmp_path, "exit 0")
    proc.start()
    proc.popen.wait()
    proc.terminate(grace=1, reason="cancelled")
    assert proc.poll() == (0, "success")


def test_leftover_children_are_killed_when_the_leader_exits(tmp_path):
    proc = make(tmp_path, "sleep 60 & echo started")
    proc.start()
    assert wait_outcome(proc) == (0, "success")
    deadline = time.monotonic() + 5
    while group_members(proc.pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group_members(proc.pgid) == []


def test_progress_file_is_read_from_the_last_complete_line(tmp_path):
    proc = make(
        tmp_path,
        'echo "0.25 warming up" >> "$BANYAN_PROGRESS_FILE"; '
        'echo "garbage" >> "$BANYAN_PROGRESS_FILE"; '
        'echo "0.5 half way there" >> "$BANYAN_PROGRESS_FILE"; '
        'printf "0.9 not fini" >> "$BANYAN_PROGRESS_FILE"',
    )
    proc.start()
    wait_outcome(proc)
    assert proc.read_progress() == {"fraction": 0.5, "message": "half way there"}


def test_report_progress_appends_lines_the_worker_can_read(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    monkeypatch.setenv("BANYAN_PROGRESS_FILE", str(path))
    report_progress(0.1, "start")
    report_progress("0.75", "multi\nline  message")
    assert read_last_progress(str(path)) == {"fraction": 0.75, "message": "multi line message"}
    with pytest.raises(ValueError, match="between 0 and 1"):
        report_progress(1.5)
    with pytest.raises(ValueError, match="not a number"):
        report_progress("half")
    monkeypatch.delenv("BANYAN_PROGRESS_FILE")
    with pytest.raises(RuntimeError, match="BANYAN_PROGRESS_FILE"):
        report_progress(0.5)


def test_time_limit_hook_terminates_with_timeout(tmp_path):
    proc = make(tmp_path, "sleep 30", time_limit=0.5, max_shutdown_time=1)
    hooks = [TimeLimit()]
    proc.start()
    deadline = time.monotonic() + 10
    outcome = None
    while outcome is None and time.monotonic() < deadline:
        run_hooks(hooks, "on_sample", proc, time.monotonic())
        outcome = proc.poll()
        time.sleep(0.05)
    assert outcome == (-signal.SIGTERM, "timeout")
    assert time.monotonic() - proc.started >= 0.5


def test_time_limit_leaves_tasks_within_their_limit_alone(tmp_path):
    proc = make(tmp_path, "sleep 0.3; exit 4", time_limit=60)
    proc.start()
    outcome = None
    while outcome is None:
        TimeLimit().on_sample(proc, time.monotonic())
        outcome = proc.poll()
        time.sleep(0.02)
    assert outcome == (4, "failure")


def test_a_failing_hook_is_logged_and_the_others_still_run(tmp_path, caplog):
    calls = []

    class Broken(TaskHook):
        def after_exit(self, task, outcome):
            raise RuntimeError("boom")

    class Recorder(TaskHook):
        def __init__(self, name):
            self.name = name

        def after_exit(self, task, outcome):
            calls.append(self.name)

    run_hooks([Recorder("first"), Broken(), Recorder("last")], "after_exit", None, None)
    assert calls == ["last", "first"]  # after_* hooks run in reverse order
    assert "Broken.after_exit failed" in caplog.text


def test_sampler_sees_the_memory_of_a_child_process(tmp_path):
    # The shell allocates nothing; its Python child holds ~200 MiB.
    script = "import time; b = bytearray(200 * 1024 * 1024); open('ready', 'w').close(); time.sleep(30)"
    proc = make(tmp_path, f'{sys.executable} -c "{script}"; true', working_directory=str(tmp_path))
    proc.start()
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "ready").exists()
        usage = proc.sample()
        assert usage["max_rss"] >= 200 * 1024 * 1024
        assert len(proc.sampler.processes()) == 2
    finally:
        proc.terminate(grace=1)


def test_sampler_measures_cpu_of_a_busy_tree(tmp_path):
    proc = make(tmp_path, f"{sys.executable} -c 'while True: pass'")
    proc.start()
    try:
        proc.sample()
        time.sleep(0.5)
        assert proc.sample()["cpu_percent"] > 10
    finally:
        proc.terminate(grace=1)


def test_machine_totals_are_positive():
    totals = resources.detect_resources()
    assert totals["cores"] >= 1
    assert totals["memory"] > 0
    assert totals["gpus"] >= 0
    assert 0 < resources.free_memory() <= totals["memory"]


def test_tree_walk_from_proc_finds_the_same_descendants_as_psutil(tmp_path):
    proc = make(tmp_path, "sh -c 'sleep 30 & sleep 30 & wait' & sleep 30 & wait")
    proc.start()
    try:
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 10
        while len(root.children(recursive=True)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        expected = sorted(p.pid for p in root.children(recursive=True))
        assert len(expected) == 4
        walked = resources.descendant_pids(proc.pid)
        if walked is not None:  # this kernel lists children in /proc
            assert sorted(walked) == expected
        assert sorted(p.pid for p in proc.sampler.processes()[1:]) == expected
    finally:
        proc.terminate(grace=1)


def test_an_attempt_whose_directory_cannot_be_made_fails_with_a_message(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = TaskProcess({"_id": "t1", "command": "echo never"}, 1, tmp_path / "file" / "attempt")
    proc.start()  # no exception: a failed attempt
    assert proc.poll() == (None, "failure")
    assert "cannot prepare" in proc.tail("stderr") and proc.tail("stdout") == ""


def _fake_nvidia_smi(tmp_path, script):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return str(bindir)


@pytest.mark.parametrize(
    "script, expected",
    [
        ("echo 0; echo 1\n", 2),  # two GPUs listed
        ('echo "NVIDIA-SMI has failed" >&2; exit 9\n', 0),  # driver broken: none
    ],
)
def test_gpus_are_counted_with_nvidia_smi_when_nvml_is_absent(tmp_path, monkeypatch, script, expected):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, script) + os.pathsep + os.environ["PATH"])
    assert resources.gpu_count() == expected


def test_no_nvml_and_no_nvidia_smi_means_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resources.gpu_count() == 0
