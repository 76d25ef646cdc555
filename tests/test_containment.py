"""Fencing and containment with real processes, signals and cgroups.

- A task's lease: its supervisor kills it when the worker stops renewing it,
  so a worker frozen with SIGSTOP past the server's heartbeat timeout never
  has its task running while another worker runs it again.
- Daemons (``setsid``, double fork) a task starts end with it: when it
  ends, when it is cancelled (by its supervisor alone, and through a real
  server and worker), when its worker is killed with SIGKILL, and
  (when the worker's supervisors died too) once a worker starts again on
  the same work directory. Checked with a cgroup and without one.
- ``--enforce-memory``: a task over its memory ends ``oom`` with its peak
  recorded; with ``retry_memory_factor`` 2 it runs again with twice the
  memory and succeeds.
"""

import json
import os
import signal
import sys
import time

import psutil
import pytest
from conftest import wait_for
from test_worker_live import HEARTBEAT_TIMEOUT, cluster, gone  # noqa: F401 - cluster is a fixture

from banyan.worker import containment, supervisor
from banyan.worker.executor import Spawner, TaskProcess

MiB = 1024**2


def cgroup_mode_or_skip(tmp_path):
    found = containment.detect(str(tmp_path / "probe"), "auto")
    found.release()
    if found.tasks_cgroup is None:
        pytest.skip("no cgroup v2 hierarchy this user can create cgroups in")


@pytest.fixture(params=["cgroup", "subreaper"])
def mode(request, tmp_path):
    if request.param == "cgroup":
        cgroup_mode_or_skip(tmp_path)
    return request.param


def read_pids(*paths):
    return [int(p.read_text()) for p in paths]


# Two daemons: one in a new session (setsid), one double-forked (its parent
# exits at once); each writes its pid, then the task goes on with `rest`.
DAEMONS = (
    "setsid sh -c 'echo $$ > d1.tmp; mv d1.tmp d1; exec sleep 1000' </dev/null >/dev/null 2>&1 & "
    "sh -c 'sh -c \"echo \\$\\$ > d2.tmp; mv d2.tmp d2; exec sleep 1000\" </dev/null >/dev/null 2>&1 &'; "
    "while [ ! -e d1 ] || [ ! -e d2 ]; do sleep 0.05; done; "
)


# -- the supervisor on its own (TaskProcess) --------------------------------

DETECTED = []


@pytest.fixture(autouse=True)
def release_cgroups():
    """Remove the (empty) cgroup directories the test's containment made."""
    yield
    while DETECTED:
        DETECTED.pop().release()


def start(tmp_path, command, mode="subreaper", lease=None, name="t1"):
    here = tmp_path / name
    here.mkdir()
    found = containment.detect(str(tmp_path / "work"), mode)
    DETECTED.append(found)
    proc = TaskProcess(
        {"_id": name, "command": command, "working_directory": str(here), "max_shutdown_time": 1},
        1,
        here / "attempt",
        lease=lease,
        containment=found.spec_for(name + "-1"),
    )
    proc.start()
    return proc, here, found


def outcome_of(proc, timeout=30):
    return wait_for(proc.poll, timeout, "the attempt to end", interval=0.02)


def test_a_task_leads_its_session_with_only_its_streams_and_default_signals(tmp_path, mode):
    """However its supervisor starts it (``posix_spawn`` without a cgroup, a
    fork born in its cgroup v2 with one), the task leads a session of its
    own, inherits no descriptor but stdin, stdout and stderr, gets SIGPIPE
    and SIGXFSZ back at their defaults (Python, the supervisor's language,
    ignores them), and runs in its attempt's cgroup."""
    proc, here, found = start(
        tmp_path,
        "echo session $$ $(cut -d' ' -f6 /proc/$$/stat); grep SigIgn /proc/self/status; "
        "echo fds $(ls /proc/self/fd); cat /proc/self/cgroup",
        mode,
    )
    assert outcome_of(proc) == (0, "success")
    lines = proc.tail("stdout").splitlines()
    session = next(line.split()[1:] for line in lines if line.startswith("session "))
    assert session[0] == session[1]  # its pid is its session's id
    ignored = int(next(line.split()[1] for line in lines if line.startswith("SigIgn:")), 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    # ls's own descriptor of the directory it lists is the fourth
    assert next(line for line in lines if line.startswith("fds ")).split()[1:] == ["0", "1", "2", "3"]
    v2 = next(line for line in lines if line.startswith("0::"))
    if mode == "cgroup":
        assert v2.endswith("/" + os.path.basename(found.spec_for("t1-1")["cgroup"]))


@pytest.mark.parametrize(
    "command, environment, where, why",
    [
        (["/nonexistent/program"], {}, None, "No such file or directory: '/nonexistent/program'"),
        (["no-such-program-anywhere"], {}, None, "no-such-program-anywhere"),
        (["true"], {"X": "1\x002"}, None, "null byte"),  # no exec can take it
        (["true"], {}, "missing", "No such file or directory"),
    ],
)
def test_a_task_that_cannot_start_fails_with_its_reason(tmp_path, mode, command, environment, where, why):
    found = containment.detect(str(tmp_path / "work"), mode)
    DETECTED.append(found)
    task = {"_id": "t1", "command": command, "environment": environment}
    if where:
        task["working_directory"] = str(tmp_path / where)
    proc = TaskProcess(task, 1, tmp_path / "attempt", containment=found.spec_for("t1-1"))
    proc.start()
    assert outcome_of(proc) == (None, "failure")
    message = proc.tail("stderr")
    assert "cannot start task t1: " in message and why in message
    assert where or environment or "No such file or directory" in message


def test_fork_into_cgroup_gives_birth_inside_the_cgroup(tmp_path):
    """The supervisor's way into a cgroup v2 (clone3): the child is in it
    from its first instruction, with no move (which waits for the kernel)."""
    cgroup_mode_or_skip(tmp_path)
    found = containment.detect(str(tmp_path / "work"), "cgroup")
    DETECTED.append(found)
    path = found.spec_for("born-1")["cgroup"]
    os.makedirs(path)
    read_end, write_end = os.pipe()
    pid = supervisor.fork_into_cgroup(path)
    if pid == 0:  # pragma: no cover (child)
        try:
            with open("/proc/self/cgroup", "rb") as fh:
                os.write(write_end, fh.read())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        seen = fh.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    os.rmdir(path)
    assert any(line.startswith("0::") and line.endswith("/born-1") for line in seen.splitlines())


def test_daemons_end_when_their_task_ends(tmp_path, mode):
    proc, here, found = start(tmp_path, DAEMONS + "exit 0", mode)
    assert outcome_of(proc) == (0, "success")
    daemons = read_pids(here / "d1", here / "d2")
    wait_for(lambda: all(gone(pid) for pid in daemons), 10, "the daemons to be gone")
    assert not os.listdir(found.records)  # the supervisor's record goes with it
    found.release()


def test_daemons_end_when_their_task_is_cancelled(tmp_path, mode):
    proc, here, found = start(tmp_path, DAEMONS + "sleep 1000", mode)
    wait_for(lambda: (here / "d1").exists() and (here / "d2").exists(), 10, "the daemons")
    daemons = read_pids(here / "d1", here / "d2")
    assert not any(gone(pid) for pid in daemons)
    proc.terminate(grace=1, reason="cancelled")
    assert proc.poll() == (-signal.SIGTERM, "cancelled")
    wait_for(lambda: all(gone(pid) for pid in daemons), 10, "the daemons to be gone")
    found.release()


@pytest.mark.slow
def test_a_lease_not_renewed_kills_the_task_tree(tmp_path):
    proc, here, _ = start(tmp_path, DAEMONS + "sleep 1000", lease=time.monotonic() + 2)
    wait_for(lambda: (here / "d1").exists() and (here / "d2").exists(), 10, "the daemons")
    daemons = read_pids(here / "d1", here / "d2")
    outcome = outcome_of(proc)
    assert outcome == (-signal.SIGKILL, "failure") and proc.result["lease_expired"]
    wait_for(lambda: all(gone(pid) for pid in daemons), 10, "the daemons to be gone")


@pytest.mark.slow
def test_a_renewed_lease_keeps_the_task_running(tmp_path):
    """The task outlives its first lease by a second, renewed every 0.1 s
    (a lease of 1.5 s leaves the test's thread that much slack on a busy machine)."""
    marker = tmp_path / "t1" / "done"
    lease = 1.5
    first = time.monotonic() + lease
    proc, here, _ = start(tmp_path, "while [ ! -e go ]; do sleep 0.05; done; touch done", lease=first)
    while proc.poll() is None:
        proc.renew(time.monotonic() + lease)  # as heartbeats the server acknowledged would
        if time.monotonic() > first + 1.0 and not (here / "go").exists():
            (here / "go").touch()
        time.sleep(0.1)
    assert proc.poll() == (0, "success") and not proc.result["lease_expired"] and marker.exists()


def test_the_task_tree_ends_when_the_worker_side_of_the_pipe_closes(tmp_path, mode):
    proc, here, found = start(tmp_path, DAEMONS + "sleep 1000", mode)
    wait_for(lambda: (here / "d1").exists() and (here / "d2").exists(), 10, "the daemons")
    pids = read_pids(here / "d1", here / "d2") + [proc.pid]
    proc.popen.stdin.close()  # what the kernel does when the worker dies
    wait_for(lambda: all(gone(pid) for pid in pids), 10, "the task and its daemons to be gone")
    proc.popen.wait(timeout=10)


def test_supervisors_forked_by_the_spawner_contain_as_well_and_a_dead_spawner_is_replaced(tmp_path):
    spawner = Spawner()
    found = containment.detect(str(tmp_path / "work"), "subreaper")
    try:
        for name in ("s1", "s2"):
            here = tmp_path / name
            here.mkdir()
            # the task waits for a gate, so its supervisor is alive (not yet reaped) when looked at
            command = DAEMONS + "while [ ! -e gate ]; do sleep 0.05; done; echo done"
            proc = TaskProcess(
                {"_id": name, "command": command, "working_directory": str(here)},
                1,
                here / "attempt",
                containment=found.spec_for(name),
                spawner=spawner,
            )
            proc.start()
            assert proc.supervisor_pid in [p.pid for p in psutil.Process(spawner._proc.pid).children()]
            (here / "gate").touch()
            assert outcome_of(proc) == (0, "success") and proc.tail("stdout") == "done\n"
            daemons = read_pids(here / "d1", here / "d2")
            wait_for(lambda: all(gone(pid) for pid in daemons), 10, "the daemons to be gone")
            spawner._proc.kill()  # the next attempt gets a new spawner
            spawner._proc.wait()
    finally:
        spawner.close()


def test_a_supervisor_takes_the_next_attempt_only_once_nothing_of_its_task_is_left(tmp_path, mode):
    """The spawner hands an attempt to the supervisor of an earlier one
    instead of forking: after a task that left daemons and ran on one CPU,
    and after one killed mid-run. Each attempt gets its own output, its
    daemons are gone (reaped, not zombies) once it is over, and the next
    one runs on every CPU the worker has, not on the earlier one's."""
    spawner = Spawner()
    found = containment.detect(str(tmp_path / "work"), mode)
    DETECTED.append(found)
    every_cpu = sorted(os.sched_getaffinity(0))
    affinity = "python3 -c 'import os; print(sorted(os.sched_getaffinity(0)))'"
    try:

        def attempt(name, command, cpus=None):
            here = tmp_path / name
            here.mkdir()
            proc = TaskProcess(
                {"_id": name, "command": command, "working_directory": str(here), "max_shutdown_time": 1},
                1,
                here / "attempt",
                containment=found.spec_for(name),
                cpus=cpus,
                spawner=spawner,
            )
            proc.start()
            return proc, here

        first, here = attempt("daemons", DAEMONS + affinity, cpus=every_cpu[:1])
        assert outcome_of(first) == (0, "success")
        assert first.tail("stdout") == "%s\n" % every_cpu[:1]
        daemons = read_pids(here / "d1", here / "d2")
        wait_for(lambda: all(gone(pid) for pid in daemons), 10, "the daemons to be gone")

        second, here = attempt("killed", "echo up; sleep 1000")
        assert second.supervisor_pid == first.supervisor_pid  # no fork: the same supervisor
        wait_for(lambda: second.live_tail("stdout", 10) == b"up\n", 10, "the second task to start")
        second.terminate(grace=0, reason="cancelled")
        assert outcome_of(second).outcome == "cancelled"
        killed = second.pid
        wait_for(lambda: gone(killed), 10, "the killed task to be reaped")

        third, _ = attempt("after", affinity + "; echo err >&2")
        assert third.supervisor_pid == first.supervisor_pid
        assert outcome_of(third) == (0, "success")
        assert (third.tail("stdout"), third.tail("stderr")) == ("%s\n" % every_cpu, "err\n")
        assert first.tail("stdout") == "%s\n" % every_cpu[:1]  # earlier output untouched
    finally:
        spawner.close()


# -- live: a real server and real banyan-worker processes --------------------

MARKER_TASK = r"""
import glob, json, os, sys, time
here = sys.argv[1]
me = os.path.join(here, "%d.json" % os.getpid())
start = time.time()
def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
others = [json.load(open(p)) for p in glob.glob(os.path.join(here, "*.json"))]
busy = [o["pid"] for o in others if alive(o["pid"])]
while True:
    with open(me + ".tmp", "w") as fh:
        json.dump({"pid": os.getpid(), "attempt": os.environ["BANYAN_ATTEMPT"], "start": start,
                   "last": time.time(), "others_alive_at_start": busy}, fh)
    os.replace(me + ".tmp", me)
    if os.environ["BANYAN_ATTEMPT"] != "1" and time.time() - start > 1:
        break
    time.sleep(0.02)
"""


def worker_supervisors(worker):
    """The worker's spawner and the supervisors it forked."""
    found = []
    for p in psutil.Process(worker.pid).children(recursive=True):
        try:
            command = " ".join(p.cmdline())
            if "import supervisor" in command or "import spawner" in command:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a supervisor that ended while the list was read
    return found


@pytest.mark.slow
def test_a_worker_frozen_past_the_heartbeat_timeout_never_overlaps_the_rerun(cluster, tmp_path):
    c = cluster()
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / "task.py").write_text(MARKER_TASK)
    frozen = c.start_worker("frozen", "--cores", "1")
    c.worker_ids(["frozen"])
    tid = c.submit(
        {"command": [sys.executable, str(tmp_path / "task.py"), str(markers)], "state": "available", "max_retries": 1}
    )
    wait_for(lambda: list(markers.glob("*.json")), 30, "the first attempt to start")
    frozen.send_signal(signal.SIGSTOP)  # the worker only: its supervisors and task go on
    stopped = time.time()
    try:
        c.start_worker("spare", "--cores", "1")
        doc = wait_for(
            lambda: (lambda d: d if d["state"] == "terminated" else None)(c.task(tid)),
            60 + HEARTBEAT_TIMEOUT,
            "the task to run again elsewhere",
        )
        resumed = time.time()
    finally:
        frozen.send_signal(signal.SIGCONT)
    runs = sorted((json.loads(p.read_text()) for p in markers.glob("*.json")), key=lambda m: m["start"])
    assert [m["attempt"] for m in runs] == ["1", "2"]
    first, second = runs
    assert doc["exit_status"] == "success"
    assert doc["history"][0]["exit_status"] == "abandoned (worker unreachable)"
    # The first copy was killed while its worker was still frozen, before
    # the second copy started, and the second copy saw no first copy alive.
    assert stopped < first["last"] < second["start"] < resumed
    assert second["others_alive_at_start"] == []
    wait_for(lambda: "lease ran out" in c.worker_log("frozen"), 30, "the thawed worker to log its lease")


@pytest.mark.slow
def test_daemons_of_a_task_end_when_it_succeeds_and_when_it_is_cancelled_through_the_server(cluster, tmp_path):
    """Through a real server and worker: one task starts its daemons and
    exits 0, another starts its own and is cancelled with PATCH."""
    c = cluster()
    ends, cancelled = tmp_path / "ends", tmp_path / "cancelled"
    ends.mkdir()
    cancelled.mkdir()
    c.start_worker("both", "--cores", "2")
    done, stopped = c.submit(
        [
            {"command": DAEMONS + "exit 0", "working_directory": str(ends), "state": "available"},
            {"command": DAEMONS + "sleep 1000", "working_directory": str(cancelled), "state": "available"},
        ]
    )
    wait_for(lambda: all((d / n).exists() for d in (ends, cancelled) for n in ("d1", "d2")), 30, "the daemons")
    daemons = read_pids(ends / "d1", ends / "d2", cancelled / "d1", cancelled / "d2")
    [done_doc] = c.wait_finished([done], timeout=30)
    assert (done_doc["state"], done_doc["exit_status"]) == ("terminated", "success")
    r = c.http.patch(c.url + "/tasks/" + stopped, json={"state": "cancelled"})
    assert r.status_code == 200, r.text
    [stopped_doc] = c.wait_finished([stopped], timeout=30)
    assert (stopped_doc["state"], stopped_doc["exit_status"]) == ("cancelled", "cancelled")
    wait_for(lambda: all(gone(pid) for pid in daemons), 10, "the daemons to be gone")


@pytest.mark.slow
def test_daemons_end_when_the_worker_is_killed(cluster, tmp_path):
    c = cluster()
    here = tmp_path / "here"
    here.mkdir()
    worker = c.start_worker("victim", "--cores", "1")
    c.submit({"command": DAEMONS + "sleep 1000", "working_directory": str(here), "state": "available"})
    wait_for(lambda: (here / "d1").exists() and (here / "d2").exists(), 30, "the daemons")
    daemons = read_pids(here / "d1", here / "d2")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    wait_for(lambda: all(gone(pid) for pid in daemons), 10, "the daemons to be gone")


@pytest.mark.slow
def test_a_worker_restarted_after_a_crash_kills_what_its_tasks_left(cluster, tmp_path, mode):
    """The worker and its supervisors all die with SIGKILL (the worker frozen
    first, so that nothing of it sees the others die): the daemons live on
    until a worker starts again on the same work directory."""
    c = cluster()
    here = tmp_path / "here"
    here.mkdir()
    worker = c.start_worker("crash", "--cores", "1", "--containment", mode)
    c.submit({"command": DAEMONS + "sleep 1000", "working_directory": str(here), "state": "available"})
    wait_for(lambda: (here / "d1").exists() and (here / "d2").exists(), 30, "the daemons")
    daemons = read_pids(here / "d1", here / "d2")
    records = c.tmp / "work" / "crash" / containment.RECORDS

    def recorded():
        found = set()
        for path in records.glob("*.json"):
            found.update(pid for pid, _ in json.loads(path.read_text())["processes"])
        return found

    if mode == "subreaper":  # without a cgroup, the record is all a successor has
        wait_for(lambda: set(daemons) <= recorded(), 10, "the supervisor to record the daemons")
    worker.send_signal(signal.SIGSTOP)
    supervisors = worker_supervisors(worker)
    assert supervisors
    for sup in supervisors:
        sup.kill()
    psutil.wait_procs(supervisors, timeout=10)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    assert not any(gone(pid) for pid in daemons)  # orphans now, nobody's to kill
    c.start_worker("crash", "--cores", "1", "--containment", mode)
    wait_for(lambda: all(gone(pid) for pid in daemons), 30, "the restarted worker to kill the daemons")
    assert "killed what a previous worker's attempt left" in c.worker_log("crash")


ALLOCATE = (
    "import time; b = bytearray(%d * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); "
    "time.sleep(0.5); print('allocated')"
)


@pytest.mark.slow
def test_enforce_memory_ends_oom_and_retries_with_more_memory(cluster, tmp_path):
    found = containment.detect(str(tmp_path / "probe"), "auto", memory=True)
    found.release()
    if found.memory_cgroup is None:
        pytest.skip("no memory cgroup (v2 memory controller or v1 memory hierarchy) can be made here")
    c = cluster()
    c.start_worker("tight", "--cores", "2", "--enforce-memory")
    command = [sys.executable, "-c", ALLOCATE % 160]
    over, retried = c.submit(
        [
            {"command": command, "state": "available", "requested_resources": {"memory": "100 MiB", "cores": 1}},
            {
                "command": command,
                "state": "available",
                "requested_resources": {"memory": "100 MiB", "cores": 1},
                "retry_memory_factor": 2,
            },
        ]
    )
    over_doc, retried_doc = c.wait_finished([over, retried], timeout=60)
    assert (over_doc["state"], over_doc["exit_status"]) == ("terminated", "oom")
    usage = over_doc["history"][0]["usage"]
    assert usage["memory_limit"] == 100 * MiB and 90 * MiB <= usage["peak_memory"] <= 100 * MiB
    assert retried_doc["exit_status"] == "success"
    assert [h["exit_status"] for h in retried_doc["history"]] == ["oom", "success"]
    assert retried_doc["requested_resources"]["memory"] == 200 * MiB
    assert retried_doc["memory_retry_count"] == 1
    assert c.logs_of(retried)["stdout"] == "allocated\n"
