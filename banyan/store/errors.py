"""What the embedded store raises when it cannot keep its promises."""

import errno

import pymongo.errors

#: OS errors that mean "no room": the store serves again once space is back.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class StoreUnavailable(pymongo.errors.PyMongoError):
    """A write could not be made durable, so it was rolled back (nothing of
    it is visible). `status` is the HTTP answer: 507 when the disk is full
    (the store serves again by itself once space is freed), 503 otherwise
    (EIO, EROFS: the disk needs attention)."""

    def __init__(self, message, status=503):
        super().__init__(message)
        self.status = status

    @classmethod
    def from_os_error(cls, err, doing, path):
        cause = errno.errorcode.get(err.errno, str(err.errno)) if err.errno else type(err).__name__
        if err.errno in _NO_SPACE:
            return cls(
                "the store is out of disk space while %s %s (%s: %s); nothing was changed: "
                "free some space and retry" % (doing, path, cause, err.strerror),
                507,
            )
        return cls(
            "the store could not write to disk while %s %s (%s: %s); nothing was changed"
            % (doing, path, cause, err.strerror or err),
            503,
        )


class StoreCorrupt(RuntimeError):
    """A data file holds a damaged record before its end: the store refuses
    to open rather than silently drop what follows it."""
