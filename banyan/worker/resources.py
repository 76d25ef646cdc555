"""What this machine has, and what a running task uses.

Totals decide what the worker registers; usage samples go into heartbeats.
Usage is summed over a task's whole process tree, because a shell command
usually does its work in children.
"""

import logging
import math
import os
import shutil
import subprocess
import time

import psutil

from . import supervisor

log = logging.getLogger(__name__)

__all__ = [
    "total_cores",
    "total_memory",
    "free_memory",
    "cpu_load",
    "gpu_count",
    "detect_resources",
    "ProcessTreeSampler",
    "Usage",
    "THREAD_VARIABLES",
    "thread_environment",
    "usable_cpus",
    "CpuAllocator",
]

#: Variables that tell multithreaded libraries (OpenMP, BLAS, MKL, numexpr,
#: numba, Julia, Rayon, TensorFlow, Go) how many threads to use. A task's own
#: ``environment`` overrides them.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMEXPR_MAX_THREADS",
    "NUMBA_NUM_THREADS",
    "JULIA_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "GOMAXPROCS",
)


def threads_for(cores):
    """Whole threads for a grant of ``cores`` (at least one)."""
    return max(1, math.ceil(float(cores) - 1e-9))


def thread_environment(cores):
    """The thread-count variables for a task granted ``cores``."""
    count = str(threads_for(cores))
    return {name: count for name in THREAD_VARIABLES}


def usable_cpus():
    """CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(psutil.cpu_count(logical=True) or 1))


class CpuAllocator:
    """Hands out CPU ids for tasks' affinity (``--pin``): distinct ones while
    there are enough, else the least used, so oversubscribed cores are shared
    evenly. Tasks that ask for no core are not pinned."""

    def __init__(self, cpus):
        self.users = {cpu: 0 for cpu in cpus}
        self.held = {}

    def take(self, key, cores):
        """CPU ids for ``key`` (a task), or None for a task asking for no core."""
        self.give_back(key)
        if not cores or cores <= 0 or not self.users:
            return None
        count = min(threads_for(cores), len(self.users))
        chosen = sorted(self.users, key=lambda cpu: (self.users[cpu], cpu))[:count]
        for cpu in chosen:
            self.users[cpu] += 1
        self.held[key] = sorted(chosen)
        return self.held[key]

    def give_back(self, key):
        for cpu in self.held.pop(key, ()):
            self.users[cpu] -= 1


def total_cores():
    """Logical CPUs this process may run on (respects affinity/cgroups where psutil can see it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return psutil.cpu_count(logical=True) or 1


def total_memory():
    """Physical memory in bytes."""
    return int(psutil.virtual_memory().total)


def free_memory():
    """Memory available to new processes right now, in bytes."""
    return int(psutil.virtual_memory().available)


def cpu_load():
    """Cores busy right now (1-minute load average), for information only."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def gpu_count():
    """Number of NVIDIA GPUs: NVML if importable, else nvidia-smi, else 0."""
    try:
        import pynvml  # optional
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                return int(pynvml.nvmlDeviceGetCount())
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # NVML raises its own error types
            log.debug("NVML unavailable: %s", exc)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed, assuming no GPUs: %s", exc)
        return 0
    return sum(1 for line in out.splitlines() if line.strip())


def _proc_children_supported():
    try:
        return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    except OSError:  # pragma: no cover
        return False


#: Linux >= 3.5 lists each thread's children in /proc: walking a tree then
#: costs a few reads, where psutil's ``children()`` reads every process's stat.
_PROC_CHILDREN = _proc_children_supported()


def descendant_pids(pid):
    """Pids of ``pid``'s live descendants, from /proc (None where /proc cannot tell)."""
    if not _PROC_CHILDREN:
        return None
    return supervisor.descendants(pid)


def detect_resources():
    """Totals as registered with the server: ``{"cores", "memory", "gpus"}``."""
    return {"cores": total_cores(), "memory": total_memory(), "gpus": gpu_count()}


class Usage(dict):
    """A usage sample in the heartbeat's shape: ``max_rss`` (bytes), ``rss``, ``cpu_percent``."""


class ProcessTreeSampler:
    """Samples memory and CPU of a process and all its descendants.

    CPU percent is computed from the change in cumulative CPU time between
    two samples (so children that exited in between don't vanish from it as
    long as they were seen once), divided by wall time; 100 means one core.
    ``max_rss`` is the highest resident-set total seen so far.
    """

    def __init__(self, pid, include_root=True):
        """``include_root=False``: only the descendants of ``pid`` (a supervisor's task tree)."""
        self.pid = pid
        self.include_root = include_root
        self.max_rss = 0
        self.rss = 0
        self.cpu_percent = 0.0
        self._cpu_times = {}  # pid -> (create_time, last cumulative cpu seconds)
        self._last_total = None  # cpu seconds summed over seen processes
        self._last_time = None
        self._first_time = None
        self._first_total = 0.0

    def processes(self):
        """The root process and its live descendants (empty once the root is gone)."""
        try:
            root = psutil.Process(self.pid)
            pids = descendant_pids(self.pid)
            if pids is None:
                return [root][: self.include_root] + root.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return []
        found = [root][: self.include_root]
        for pid in pids:
            try:
                found.append(psutil.Process(pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def sample(self, now=None):
        """Take one sample and return it as a ``Usage``."""
        now = time.monotonic() if now is None else now
        rss = 0
        for proc in self.processes():
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    cpu = times.user + times.system
                    key = (proc.pid, proc.create_time())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self._cpu_times[key] = cpu
        total = sum(self._cpu_times.values())
        if self._first_time is None:
            self._first_time, self._first_total = now, total
        if self._last_time is not None and now > self._last_time:
            self.cpu_percent = max(0.0, 100.0 * (total - self._last_total) / (now - self._last_time))
        self._last_total, self._last_time = total, now
        self.rss = rss
        self.max_rss = max(self.max_rss, rss)
        return self.usage()

    def usage(self):
        """The latest figures without sampling again."""
        return Usage(max_rss=int(self.max_rss), rss=int(self.rss), cpu_percent=round(self.cpu_percent, 1))

    def average_cpu_percent(self):
        """CPU percent averaged from the first sample to the last (for the final report)."""
        if self._first_time is None or self._last_time is None or self._last_time <= self._first_time:
            return round(self.cpu_percent, 1)
        return round(100.0 * (self._last_total - self._first_total) / (self._last_time - self._first_time), 1)
