"""Per-task policies, as small classes in the style of Dramatiq middleware.

The worker calls every hook's ``before_start`` in order, ``on_sample`` on
each supervision tick, and ``after_exit`` in reverse order. A hook that
raises is logged and does not stop the worker or the task (see
``run_hooks``). ``task`` is the attempt's ``TaskProcess``.
"""

import logging

from ..protocol import Outcome as Ended

log = logging.getLogger(__name__)

__all__ = ["TaskHook", "TimeLimit", "run_hooks"]


class TaskHook:
    """Base class: every method is a documented no-op; override what you need."""

    def before_start(self, task):
        """Called just before the attempt's process is started."""

    def on_sample(self, task, now):
        """Called on each supervision tick while the task runs; ``now`` is ``time.monotonic()``."""

    def after_exit(self, task, outcome):
        """Called once the attempt has an ``Outcome``, before it is reported."""


class TimeLimit(TaskHook):
    """Stops a task that runs longer than its ``time_limit`` (seconds), with outcome "timeout".

    The deadline is measured on the monotonic clock from the moment the
    process started, and termination uses the task's ``max_shutdown_time``
    as grace period, like a cancellation.
    """

    def on_sample(self, task, now):
        limit = task.task.get("time_limit")
        if limit is None or task.started is None or task.stop_reason is not None:
            return
        if now - task.started >= float(limit):
            log.warning("task %s exceeded its time limit of %ss; terminating", task.task_id, limit)
            task.terminate(task.max_shutdown_time, reason=Ended.TIMEOUT.value, wait=False)


def run_hooks(hooks, method, *args):
    """Call ``method`` on every hook (reverse order for ``after_*``), logging failures."""
    ordered = reversed(hooks) if method.startswith("after_") else hooks
    for hook in ordered:
        try:
            getattr(hook, method)(*args)
        except Exception:
            log.critical("hook %s.%s failed", type(hook).__name__, method, exc_info=True)
