"""The supervisor role, run by the worker's main thread: it starts claimed
tasks, samples and polls them, runs hooks, acts on cancellations, enforces
liveness and the drain deadline.

It sleeps on ``wake``, which is set when claimed tasks arrive, when a
control message (cancel, unknown) comes in and when a task's process exits
(a small watcher thread per attempt), so a short task costs no tick.
"""

import logging
import os
import subprocess
import threading
import time

from ..protocol import Outcome as Ended
from . import containment, resources
from .executor import OUTPUT_LIMIT, Outcome, Spawner, SupervisorPool, TaskProcess, become_subreaper, reap_orphans
from .holdings import attempt_of, requested
from .hooks import run_hooks

log = logging.getLogger(__name__)

__all__ = ["Supervision", "CannotContain"]

#: Seconds between usage samples of a running task.
SAMPLE_INTERVAL = 1.0


class CannotContain(Exception):
    """The work directory is another worker's, or tasks cannot be contained as asked."""


class Supervision:
    """The main loop's work, one ``step`` per tick. Its own state: the work
    directory's lock, the containment, the spawner and the pool of
    supervisors started ahead, when each task was last sampled, when orphans
    were last reaped, the drain deadline; the task processes it runs are in
    the holdings, which it shares."""

    def __init__(self, config, holdings, registration, reporter, hooks, stopping, wake):
        self.config = config
        self.holdings = holdings
        self.registration = registration
        self.reporter = reporter
        self.hooks = hooks
        self.stopping = stopping  # Event: warm stop, register no more
        self.wake = wake  # Event: something to do now
        # Supervisors started ahead of their attempts (one per core, up to 4),
        # forked by the spawner once it runs (`contain`).
        self.supervisors = SupervisorPool(size=max(1, min(4, int(holdings.total["cores"]))))
        self.containment = None  # what keeps tasks' processes together (`contain`)
        self.spawner = None
        self.subreaper = False  # reaps the orphans of tasks (`contain`)
        self.drain_deadline = None  # monotonic, once a warm stop began
        self._work_dir_lock = None
        self._last_sample = {}
        self._last_reap = 0.0

    def contain(self, subreaper=False):
        """Lock the work directory, find the cgroups this worker can use, kill
        what the tasks of a previous worker on this directory left, start the
        spawner, and (``subreaper``) adopt the orphans of tasks.
        CannotContain when the directory is taken or no containment works."""
        try:
            self._work_dir_lock = containment.lock_work_dir(self.config.work_dir)
            found = self.containment = containment.detect(
                self.config.work_dir, self.config.containment, memory=self.config.enforce_memory
            )
        except (containment.WorkDirBusy, RuntimeError, OSError) as exc:
            raise CannotContain(str(exc)) from exc
        if self.config.enforce_memory and found.memory_cgroup is None:
            log.error("--enforce-memory: no memory cgroup can be made here; memory is not enforced")
        log.info("tasks contained by %s", found.describe())
        containment.kill_leftovers(found)
        self.spawner = self.supervisors.spawner = Spawner()
        self.supervisors.fill()
        if subreaper and not become_subreaper():
            log.info("cannot become a child subreaper; orphans of tasks go to init")
            subreaper = False
        self.subreaper = subreaper

    def close(self):
        """Let go of the supervisors, the spawner, the cgroups and the work directory."""
        self.supervisors.close()
        if self.spawner is not None:
            self.spawner.close()
        if self.containment is not None:
            self.containment.release()
        if self._work_dir_lock is not None:
            self._work_dir_lock.close()
            self._work_dir_lock = None

    def step(self, now):
        """One round of the main loop."""
        self.check_liveness(now)
        self.maybe_register(now)
        self.apply_control()
        self.start_claimed()
        self.supervise(now)
        self.reap_orphans(now)
        self.check_drain(now)

    def wait(self, seconds):
        """The main loop's pause; ends early when there is something to do (see ``wake``)."""
        self.wake.wait(seconds)
        self.wake.clear()

    # == liveness and registration ==========================================

    def check_liveness(self, now):
        """Server forgot us, or silent past the timeout: kill and drop every task."""
        registration = self.registration
        if registration.worker_id is None:
            return
        if registration.lost.is_set():
            self.reset("the server no longer knows worker %s" % registration.worker_id)
        elif registration.silent_for(now) > self.config.timeout:
            self.reset("server unreachable for %.0fs" % registration.silent_for(now))

    def reset(self, reason):
        """Drop everything the server may have given to someone else, and register anew later."""
        holdings = self.holdings
        with holdings.lock:
            victims = list(holdings.running.items())
            holdings.running.clear()
            for task in holdings.inbox:
                holdings.release(str(task["_id"]))
            holdings.inbox.clear()
            holdings.waiting.clear()  # the server gives them to others
            holdings.handing_back.clear()
            holdings.control.clear()
            for task_id, proc in victims:
                holdings.doomed[task_id] = proc
            for task_id in list(holdings.reserved):
                if task_id not in holdings.doomed:  # finished, report pending: not ours any more
                    holdings.release(task_id)
            self.registration.worker_id = None
        log.error("%s: killing %d task(s) and registering again", reason, len(victims))
        for _, proc in victims:
            proc.terminate(proc.max_shutdown_time, reason=Ended.FAILURE.value, wait=False)
        self.registration.given_up()

    def maybe_register(self, now):
        """After a reset, register again with backoff (never while stopping)."""
        if self.stopping.is_set():
            return
        self.registration.maybe_register_again(now)

    # == tasks ==============================================================

    def apply_control(self):
        """Act on ``cancel`` and ``unknown`` lists from claims and heartbeats.

        An ``unknown`` concerns the attempt the heartbeat reported: by the
        time the answer arrives that attempt may have ended and the task been
        claimed again, and the new attempt is ours.
        """
        holdings = self.holdings
        while True:
            with holdings.lock:
                if not holdings.control:
                    return
                action, task_id, attempt = holdings.control.popleft()
                proc = holdings.running.get(task_id)
                pending = next((t for t in holdings.inbox if str(t["_id"]) == task_id), None)
                waiting = next((e for e in holdings.waiting if str(e[0]["_id"]) == task_id), None)
                if waiting is not None and action == "cancel":  # prefetched: it never started
                    holdings.waiting.remove(waiting)
                    self.report_unstarted(waiting[0], Ended.CANCELLED)
                if action == "unknown":
                    if proc is not None and attempt is not None and proc.attempt != attempt:
                        proc = None
                    pending = None  # claimed after that heartbeat was sent
                    if proc is not None:
                        del holdings.running[task_id]
                        holdings.doomed[task_id] = proc
                if pending is not None:
                    holdings.inbox.remove(pending)
                    holdings.release(task_id)
            if action == "cancel":
                if proc is not None and proc.stop_reason is None:
                    log.info("task %s: cancellation requested", task_id)
                    proc.terminate(proc.max_shutdown_time, reason=Ended.CANCELLED.value, wait=False)
                elif pending is not None:
                    self.report_unstarted(pending, Ended.CANCELLED)
            elif proc is not None:
                log.warning("task %s: the server says it is no longer ours; killing it", task_id)
                proc.terminate(proc.max_shutdown_time, reason=Ended.FAILURE.value, wait=False)

    def start_claimed(self):
        """Start every claimed task that fits what is free. A prefetched one
        waits for room, at most ``prefetch_hold`` seconds: then, or once the
        worker stops, it goes back (the reporter hands it back)."""
        holdings = self.holdings
        holdings.promote()
        holdings.give_up_waiting(None if self.stopping.is_set() else time.monotonic() - self.config.prefetch_hold)
        while True:
            with holdings.lock:
                if not holdings.inbox:
                    return
                task = holdings.inbox.pop(0)
                task_id = str(task["_id"])
                wanted = requested(task)
                gpu_ids = holdings.assign_gpus(task_id, wanted["gpus"])
                cpus = holdings.cpus.take(task_id, wanted["cores"]) if holdings.cpus is not None else None
                # this attempt's own: the task may be claimed again while it dies
                reservation = holdings.reserved.get(task_id)
                lease = self.registration.lease_deadline
            attempt = attempt_of(task)
            extra_env = {
                "BANYAN_CORES": "%g" % wanted["cores"],
                "BANYAN_SERVER": self.config.server,
                "BANYAN_JOB_ID": str(task.get("job") or ""),
            }
            if cpus:
                extra_env["BANYAN_CPUS"] = ",".join(map(str, cpus))
            if holdings.total["gpus"] > 0:
                extra_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
            limit = wanted["memory"] if self.config.enforce_memory else None
            proc = TaskProcess(
                task,
                attempt,
                self.attempt_dir(task_id, attempt),
                extra_env,
                thread_env=resources.thread_environment(wanted["cores"]),
                lease=lease,
                containment=self.containment.spec_for(f"{task_id}-{attempt}", limit)
                if self.containment is not None
                else None,
                cpus=cpus,
                output_cap=self.config.output_cap,
                supervisors=self.supervisors,
                spawner=self.spawner,
            )
            proc.reservation = reservation
            run_hooks(self.hooks, "before_start", proc)
            proc.start(wait=False)  # its supervisor says "started" to a later poll()
            proc.sample()
            with holdings.lock:
                holdings.running[task_id] = proc
                latest = self.registration.lease_deadline
            if latest is not None and latest != lease:
                proc.renew(latest)  # a heartbeat was acknowledged while it started
            self._watch_exit(proc)

    def _watch_exit(self, proc):
        """Wake the main loop as soon as the attempt's process exits (it is reaped there)."""
        if proc.popen is None or proc.poll() is not None:
            self.wake.set()  # never started: its outcome is ready now
            return

        if not isinstance(proc.popen, subprocess.Popen):  # forked by the spawner: not our child

            def watch_spawned(supervisor=proc.popen):
                supervisor.wait()
                self.wake.set()

            threading.Thread(target=watch_spawned, name=f"banyan-watch-{proc.supervisor_pid}", daemon=True).start()
            return

        def watch(pid=proc.supervisor_pid):
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass  # already reaped by the main loop
            except OSError:
                log.debug("cannot watch pid %s", pid, exc_info=True)
            self.wake.set()

        threading.Thread(target=watch, name=f"banyan-watch-{proc.pid}", daemon=True).start()

    def supervise(self, now):
        """Sample, run hooks, and collect the attempts that ended."""
        holdings = self.holdings
        with holdings.lock:
            running = list(holdings.running.items())
            doomed = list(holdings.doomed.items())
        for task_id, proc in running:
            if now - self._last_sample.get(task_id, 0.0) >= SAMPLE_INTERVAL:
                proc.sample(now)
                self._last_sample[task_id] = now
            run_hooks(self.hooks, "on_sample", proc, now)
            outcome = proc.poll(now)
            if outcome is not None and (proc.result or {}).get("lease_expired"):
                self._lease_ran_out(task_id, proc)
            elif outcome is not None:
                self.finish_attempt(task_id, proc, outcome)
        for task_id, proc in doomed:
            if proc.poll(now) is not None:
                log.info("task %s killed and dropped", task_id)
                with holdings.lock:
                    holdings.doomed.pop(task_id, None)
                    holdings.release(task_id, proc.reservation)
                holdings.remove_attempt_dir(proc)

    def _lease_ran_out(self, task_id, proc):
        """The supervisor killed the task: no heartbeat was acknowledged for a
        lease. The server may have given the task to another worker, so the
        attempt is not ours to report: as when the server is unreachable past
        the timeout, drop every task and register again."""
        holdings = self.holdings
        with holdings.lock:
            if holdings.running.get(task_id) is proc:
                del holdings.running[task_id]
                holdings.doomed[task_id] = proc
            registered = self.registration.worker_id is not None
        if registered:
            self.reset(
                "no heartbeat acknowledged for %.1fs (the lease on task %s ran out)"
                % (self.registration.lease, task_id)
            )

    def reap_orphans(self, now):
        """As subreaper, reap the dead leftovers of task trees now and then."""
        if not self.subreaper or now - self._last_reap < SAMPLE_INTERVAL:
            return
        self._last_reap = now
        with self.holdings.lock:
            keep = {
                p.supervisor_pid
                for p in list(self.holdings.running.values()) + list(self.holdings.doomed.values())
                if p.supervisor_pid is not None
            }
        reap_orphans(keep)

    def report_unstarted(self, task, ended, stderr=""):
        """Queue the report of an attempt that never started (cancelled
        while prefetched or before its start, or claimed during a cold
        stop): `ended` (a protocol Outcome), no exit code, output or usage."""
        self.reporter.put(
            task, attempt_of(task), Outcome(None, ended.value), "", stderr, {"max_rss": 0, "cpu_percent": 0.0}
        )

    def finish_attempt(self, task_id, proc, outcome):
        """Queue an ended attempt's report (its output, usage and outcome)."""
        run_hooks(self.hooks, "after_exit", proc, outcome)
        usage = proc.usage()
        if proc.sampler is not None:
            usage["cpu_percent"] = proc.sampler.average_cpu_percent()
        if proc.started is not None:
            self.holdings.ran(time.monotonic() - proc.started)
        with self.holdings.lock:
            self.holdings.running.pop(task_id, None)
            self._last_sample.pop(task_id, None)
            # The task keeps its resources until the server has the report:
            # until then the server counts it as running here, and a claim
            # made now would put more on this worker than it has.
            reservation = proc.reservation
        self.reporter.put(
            proc.task,
            proc.attempt,
            outcome,
            proc.tail_bytes("stdout", OUTPUT_LIMIT),
            proc.tail_bytes("stderr", OUTPUT_LIMIT),
            usage,
            proc,
            reservation,
        )

    def check_drain(self, now):
        """Past the drain deadline: terminate what is still running (outcome "failure")."""
        if self.drain_deadline is None or now < self.drain_deadline:
            return
        with self.holdings.lock:
            running = list(self.holdings.running.values())
        for proc in running:
            if proc.kill_deadline is None:
                log.warning("task %s still running after the drain period; terminating it", proc.task_id)
                proc.terminate(proc.max_shutdown_time, reason=Ended.FAILURE.value, wait=False)

    def attempt_dir(self, task_id, attempt):
        return os.path.join(self.config.work_dir, task_id, f"attempt-{attempt}")

    def end_all(self, forced):
        """At the end: kill what is left, queue the reports of what ran and of
        what was claimed but never started."""
        holdings = self.holdings
        with holdings.lock:
            left = list(holdings.running.items()) + list(holdings.doomed.items())
        for _task_id, proc in left:
            if forced:
                proc.kill()
            proc.terminate(0 if forced else proc.max_shutdown_time, reason=Ended.FAILURE.value, wait=True)
        with holdings.lock:
            for task_id, proc in list(holdings.running.items()):
                self.finish_attempt(task_id, proc, proc.poll())
            holdings.doomed.clear()
            unstarted, holdings.inbox = holdings.inbox, []
        for task in unstarted:  # claimed during a cold stop: hand them back as failed attempts
            self.report_unstarted(task, Ended.FAILURE, "banyan-worker stopped before starting this task\n")
