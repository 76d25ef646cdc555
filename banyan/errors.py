"""The errors of the HTTP API as the client reports them, and how to word them.

Apart from `banyan.client` so that the `banyan` command can name them (and
answer `--help`) without importing an HTTP library.
"""

__all__ = ["BanyanError", "ServerUnreachable", "WrongScheme", "describe_result"]


class BanyanError(Exception):
    """The server refused a request: ``status`` (HTTP code), ``message`` and Eve's ``issues``."""

    def __init__(self, status, message, issues=None, payload=None):
        self.status = status
        self.message = message
        self.issues = issues or {}
        self.payload = payload
        super().__init__(self.describe())

    def describe(self):
        text = f"{self.status}: {self.message}" if self.status is not None else str(self.message)
        if self.issues:
            text += " (" + "; ".join(f"{field}: {issue}" for field, issue in _flatten_issues(self.issues)) + ")"
        return text


class ServerUnreachable(BanyanError):
    """No usable answer after all retries: connection failures, timeouts or 502/503/504.

    ``status`` is None for connection failures, else the last gateway status.
    ``url`` is the server's base URL and ``reason`` a short cause
    (``"connection refused"``, ``"no answer within 30s"``, ``"503 ..."``).
    """

    def __init__(self, status, message, issues=None, payload=None, url=None, reason=None, maybe_done=False):
        self.url = url
        self.reason = reason or message
        #: the request reached the server, which may have acted on it (a
        #: change whose answer was lost): look before sending it again
        self.maybe_done = maybe_done
        super().__init__(status, message, issues, payload)


class WrongScheme(ServerUnreachable):
    """An ``https://`` URL for a server that speaks plain HTTP."""


def _flatten_issues(issues, prefix=""):
    if isinstance(issues, dict):
        for key, value in issues.items():
            yield from _flatten_issues(value, f"{prefix}{key}.")
    elif isinstance(issues, list):
        for value in issues:
            yield from _flatten_issues(value, prefix)
    else:
        yield prefix.rstrip("."), issues


def describe_result(result):
    """One line for a refused item of a bulk answer (None if it was accepted)."""
    if not isinstance(result, dict) or result.get("_status") != "ERR":
        return None
    error = result.get("_error")
    message = error.get("message") if isinstance(error, dict) else error
    issues = result.get("_issues")
    if issues:
        details = "; ".join(
            str(issue) if not field else f"{field}: {issue}" for field, issue in _flatten_issues(issues)
        )
        message = f"{message} ({details})" if message else details
    return message or "refused"
