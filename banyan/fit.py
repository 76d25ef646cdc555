"""Whether a task's request fits what a worker offers: the one rule behind
the server's claims and held claims (against what a worker has free), its
pending reason `no_worker_fits` and `banyan submit`'s warning (imports
nothing of the server, so the command stays quick to start)."""

from banyan.protocol import RESOURCES
from banyan.units import format_size


def fits(asks, offers):
    """True if a worker offering `offers` could ever run a task asking `asks`."""
    return all((asks.get(key) or 0) <= (offers.get(key) or 0) for key in RESOURCES)


def largest_offers(workers):
    """The most any of `workers` (documents with `resources`) offers of each resource."""
    return {key: max([(w.get("resources") or {}).get(key) or 0 for w in workers] or [0]) for key in RESOURCES}


def describe_request(asks, keys=RESOURCES):
    """'cores 2, memory 1.0 GiB, gpus 1' for the `keys` of `asks`."""
    parts = []
    for key in keys:
        value = asks.get(key) or 0
        parts.append("%s %s" % (key, format_size(value) if key == "memory" else ("%g" % value)))
    return ", ".join(parts)


def short_of(asks, largest):
    """The resources `asks` wants more of than any worker offers (all of them
    when each alone is offered somewhere but no one worker has them all)."""
    return [key for key in RESOURCES if (asks.get(key) or 0) > (largest.get(key) or 0)] or list(RESOURCES)
