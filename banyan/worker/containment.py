"""Keeping every process of a task inside what the worker can kill.

Each attempt runs under a supervisor (``supervisor.py``), a child subreaper
that tracks the task's whole tree, daemons included. On top of that, where
the worker can create cgroups:

- cgroup v2 (the unified hierarchy, wherever it is mounted): each attempt
  gets a cgroup of its own under ``<the worker's cgroup>/banyan-<key>/``;
  nothing the task starts can leave it, and ``cgroup.kill`` ends it whole;
- memory (``--enforce-memory``): a v2 cgroup with the memory controller, or
  else the v1 memory hierarchy, with the task's requested memory as its
  limit and no swap; the kernel's OOM kill there makes the outcome ``oom``.

``<key>`` comes from the work directory, which one worker at a time may use
(``lock_work_dir``); a worker starting on it kills what the previous one's
tasks left (``kill_leftovers``): the pids its supervisors recorded with their
start times, and whatever is in its cgroups.
"""

import fcntl
import glob
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from . import supervisor as sup

log = logging.getLogger(__name__)

__all__ = ["Containment", "detect", "lock_work_dir", "kill_leftovers", "MODES"]

#: ``--containment`` choices: ``auto`` uses a cgroup when one can be made,
#: ``cgroup`` insists on one, ``subreaper`` never uses one.
MODES = ("auto", "cgroup", "subreaper")
#: Where the supervisors of running attempts keep their records, in the work dir.
RECORDS = ".supervisors"


class WorkDirBusy(Exception):
    """Another live worker uses this work directory."""


@dataclass
class Containment:
    """What this worker can use. ``tasks_cgroup``: the v2 directory under which
    each attempt gets a cgroup (None: subreaper tracking only);
    ``memory_cgroup``/``memory_version``: where memory limits go (None: none)."""

    work_dir: str
    tasks_cgroup: Optional[str] = None
    memory_cgroup: Optional[str] = None
    memory_version: Optional[int] = None

    @property
    def mode(self):
        return "cgroup" if self.tasks_cgroup else "subreaper"

    @property
    def records(self):
        return os.path.join(self.work_dir, RECORDS)

    def spec_for(self, name, memory_limit=None):
        """The supervisor spec's containment fields for one attempt."""
        spec = {"record": os.path.join(self.records, name + ".json")}
        if self.tasks_cgroup:
            spec["cgroup"] = os.path.join(self.tasks_cgroup, name)
        if memory_limit and self.memory_cgroup:
            if self.memory_version == 2 and self.tasks_cgroup == self.memory_cgroup:
                spec["memory_cgroup"] = spec["cgroup"]
            else:
                spec["memory_cgroup"] = os.path.join(self.memory_cgroup, name)
            spec.update(memory_version=self.memory_version, memory_limit=int(memory_limit))
        return spec

    def release(self):
        """Remove this worker's (empty) cgroup directories when it stops."""
        for parent in {self.tasks_cgroup, self.memory_cgroup} - {None}:
            sup.cgroup_remove(parent)

    def describe(self):
        memory = ("memory limits in cgroup v%d" % self.memory_version) if self.memory_cgroup else "no memory limits"
        where = ("cgroup v2 under %s" % self.tasks_cgroup) if self.tasks_cgroup else "subreaper process tracking"
        return "%s, %s" % (where, memory)


# == finding the hierarchies ==================================================


def _mounts():
    """``[(mount point, fstype, super options)]`` of cgroup file systems."""
    found = []
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                    found.append((fields[4], fields[3], rfields[0], rfields[2].split(",")))
    except OSError:
        pass
    return found


def _own_cgroups():
    """``{controller or "": path}`` from /proc/self/cgroup ("" is the v2 hierarchy)."""
    own = {}
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name in controllers.split(",") if controllers else [""]:
                    own[name] = path
    except OSError:
        pass
    return own


def _place(mount_point, mount_root, path):
    """The directory of cgroup ``path`` under a mount of ``mount_root``, or None."""
    if not path.startswith(mount_root):
        return None
    directory = os.path.join(mount_point, path[len(mount_root) :].lstrip("/"))
    return directory if os.path.isdir(directory) else None


def _key(work_dir):
    return "banyan-" + hashlib.sha1(os.path.realpath(work_dir).encode()).hexdigest()[:12]


def _usable(parent):
    """True when a process can be put in a new cgroup under ``parent`` (a probe
    child does it, as the supervisor will)."""
    probe = os.path.join(parent, "probe-%d" % os.getpid())
    try:
        os.makedirs(probe, exist_ok=True)
        done = subprocess.run(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                "import sys; open(sys.argv[1] + '/cgroup.procs', 'w').write('0')",
                probe,
            ],
            capture_output=True,
            timeout=30,
        )
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        for _ in range(50):  # the exited probe may take a moment to leave it
            if sup.cgroup_remove(probe):
                break
            time.sleep(0.01)


def _parent(work_dir, controller):
    """This work dir's cgroup for its attempts, made under the worker's own
    cgroup: in the v2 hierarchy (`controller` "") or in the v1 hierarchy of
    `controller` ("memory"). None where none can be made and used."""
    own = _own_cgroups().get(controller)
    if own is None:
        return None
    for point, root, fstype, options in _mounts():
        ours = (fstype == "cgroup" and controller in options) if controller else fstype == "cgroup2"
        if not ours:
            continue
        base = _place(point, root, own)
        if base is None:
            continue
        parent = os.path.join(base, _key(work_dir))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            log.info("cannot create a %scgroup under %s: %s", controller and controller + " ", base, exc)
            continue
        if _usable(parent):
            return parent
        sup.cgroup_remove(parent)
    return None


def _v2_memory(parent):
    """Enable the memory controller for the attempts' cgroups under ``parent``, if it can be."""

    def controllers(path, name="cgroup.controllers"):
        try:
            with open(os.path.join(path, name)) as fh:
                return fh.read().split()
        except OSError:
            return []

    if "memory" not in controllers(parent):
        # The worker's own cgroup must hand it down; that fails (EBUSY) when
        # processes live in it, unless it is the root.
        try:
            sup.write_file(os.path.join(os.path.dirname(parent), "cgroup.subtree_control"), "+memory")
        except OSError:
            return False
    try:
        if "memory" not in controllers(parent, "cgroup.subtree_control"):
            sup.write_file(os.path.join(parent, "cgroup.subtree_control"), "+memory")
    except OSError:
        return False
    return True


def detect(work_dir, mode="auto", memory=False):
    """What this worker can use. ``mode`` is one of ``MODES``; ``memory``:
    memory limits are wanted. Raises RuntimeError when ``mode`` is
    ``cgroup`` and no cgroup can be made."""
    if mode not in MODES:
        raise ValueError("containment must be one of %s, not %r" % (", ".join(MODES), mode))
    found = Containment(work_dir=work_dir)
    if mode != "subreaper":
        found.tasks_cgroup = _parent(work_dir, "")
        if found.tasks_cgroup is None and mode == "cgroup":
            raise RuntimeError("no cgroup v2 hierarchy this worker can create cgroups in")
    if memory:
        if found.tasks_cgroup and _v2_memory(found.tasks_cgroup):
            found.memory_cgroup, found.memory_version = found.tasks_cgroup, 2
        else:
            parent = _parent(work_dir, "memory")
            if parent is not None:
                found.memory_cgroup, found.memory_version = parent, 1
    os.makedirs(found.records, exist_ok=True)
    return found


# == the work directory =======================================================


def lock_work_dir(work_dir):
    """Take the work directory for this worker; the open lock file (keep it
    open while the worker lives). WorkDirBusy if another worker has it."""
    os.makedirs(work_dir, exist_ok=True)
    handle = open(os.path.join(work_dir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise WorkDirBusy("work directory %s is in use by another banyan-worker (pid %s)" % (work_dir, owner)) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def kill_leftovers(containment):
    """Kill what the attempts of a previous worker on this work directory left
    (its supervisors died with it); returns how many records were cleaned."""
    cleaned = 0
    for path in sorted(glob.glob(os.path.join(containment.records, "*.json"))):
        try:
            with open(path) as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            record = {}
        processes = [record["supervisor"]] if record.get("supervisor") else []
        processes += record.get("processes") or []
        cgroups = record.get("cgroups") or []
        if not sup.kill_recorded(processes, cgroups):
            log.warning("processes of %s would not die", path)
        for group in cgroups:
            sup.cgroup_remove(group)
        log.warning("killed what a previous worker's attempt left (%s)", os.path.basename(path))
        cleaned += 1
        for leftover in (path, path + ".tmp"):
            try:
                os.unlink(leftover)
            except OSError:
                pass
    for parent in {containment.tasks_cgroup, containment.memory_cgroup} - {None}:
        for group in glob.glob(os.path.join(parent, "*", "")):
            group = group.rstrip("/")
            if sup.cgroup_pids(group):
                log.warning("killing what is left in cgroup %s", group)
                sup.kill_recorded([], [group])
            sup.cgroup_remove(group)
    return cleaned
