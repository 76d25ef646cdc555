"""Python client for the Banyan HTTP API, shared by the CLI and the worker.

This is the only module that knows URLs. It retries, with capped
exponential backoff, what is worth retrying right away (connection
failures, 502/503/504); anything longer-lived is the caller's business
(the worker loop has its own backoff and liveness rules).
"""

import base64
import json
import logging
import os
import re
import socket
import ssl
import time
import uuid
from urllib.parse import quote, urlencode, urlsplit

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, ReadTimeoutError

from banyan.errors import BanyanError, ServerUnreachable, WrongScheme, describe_result
from banyan.protocol import TaskState

log = logging.getLogger(__name__)

__all__ = ["Client", "BanyanError", "ServerUnreachable", "WrongScheme", "check_server_url", "describe_result"]

#: Idle connections a session keeps to its server.
POOL_SIZE = 4
_RETRY_STATUSES = frozenset({502, 503, 504})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


def _short_reason(exc):
    """A few words on why a connection failed, from the deepest OSError in the chain."""
    seen, current, reason = set(), exc, None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reason = current.strerror
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException) and id(arg) not in seen:
                inner = _short_reason(arg)
                if inner:
                    reason = inner
        current = current.__cause__ or current.__context__ or getattr(current, "reason", None)
        if not isinstance(current, BaseException):
            current = None
    if reason is None:
        text = str(exc)
        match = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
        reason = match.group(1) if match else None
    return reason.lower() if reason else None


def _never_sent(exc):
    """The connection was never made (refused, or no answer to connect), so
    the server cannot have acted on the request."""
    return isinstance(exc, ConnectTimeoutError)  # NewConnectionError (refused, no route) is one


#: First path segments of the API: a server URL that ends in one is a mistake.
_API_PATHS = frozenset({"tasks", "workers", "stats", "metrics", "tokens", "dashboard", "openapi.json"})
#: Seconds the TLS handshake of an ``https://`` URL may take before the
#: server is asked, in plain HTTP, whether it speaks that instead.
TLS_PROBE_TIMEOUT = 1.0


def check_server_url(url):
    """``url`` as the client uses it (``http://`` added when no scheme is
    given); ValueError explaining a URL that names an endpoint."""
    if not url:
        raise ValueError("a server URL is required")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"server URL {url!r}: use http:// or https://, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError(f"server URL {url!r} names no host; use http://HOST:PORT")
    segments = [s for s in parts.path.split("/") if s]
    if segments and segments[0] in _API_PATHS or parts.query:
        raise ValueError(
            f"server URL {url!r} names an endpoint; give only the server's address, "
            f"{parts.scheme}://{parts.netloc} (the client adds /tasks, /workers, ...)"
        )
    return url.rstrip("/")


def _speaks_plain_http(host, port, timeout=TLS_PROBE_TIMEOUT):
    """True when ``host:port`` does not complete a TLS handshake within
    ``timeout`` but answers a plain HTTP request: an ``https://`` URL for an
    ``http://`` server (whose waitress would otherwise wait for the rest of
    a request that never comes)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with context.wrap_socket(raw, server_hostname=host):
                return False  # it speaks TLS
    except (ssl.SSLError, socket.timeout):
        pass
    except OSError:
        return False  # refused, unreachable: the request itself will say so
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.sendall(b"HEAD / HTTP/1.0\r\nHost: %s\r\n\r\n" % host.encode("idna"))
            return raw.recv(5) == b"HTTP/"
    except OSError:
        return False


def running_task_id(environ=None):
    """The id of the task this process runs in ($BANYAN_TASK_ID, set by
    the worker for each attempt); ValueError outside a task."""
    task_id = (os.environ if environ is None else environ).get("BANYAN_TASK_ID")
    if not task_id:
        raise ValueError("BANYAN_TASK_ID is not set: children are added from a command a task runs")
    return task_id


class Client:
    """An HTTP connection pool bound to one server and token: urllib3's
    own (``requests`` on top of it was a third of ``banyan ls``' start-up).

    ``attempts`` is the number of tries for retryable failures, with the
    wait doubling from ``backoff`` up to ``max_backoff`` seconds. ``sleep``
    is how waits are done (a worker passes ``stop_event.wait`` so a stop
    request cuts them short).
    """

    def __init__(
        self, url, token=None, timeout=30.0, attempts=4, backoff=0.5, max_backoff=8.0, sleep=time.sleep, session=None
    ):
        self.url = check_server_url(url)
        self._scheme_checked = not self.url.startswith("https://")
        self.timeout = timeout
        self.attempts = max(1, int(attempts))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        self._owns_session = session is None
        self.session = session or self.make_session(token)

    @staticmethod
    def make_session(token=None, pool_size=POOL_SIZE):
        """A session for one server and token, keeping at most `pool_size`
        idle connections (more are opened when needed, never waited for,
        and closed after use). Several clients (one per thread, each with
        its own timeouts) may share it: a worker holds a handful of
        connections rather than a pool per thread. urllib3 neither retries
        nor follows redirects here: `request` decides what is retried."""
        headers = {"Accept": "application/json", "User-Agent": "banyan-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return urllib3.PoolManager(num_pools=2, maxsize=pool_size, block=False, headers=headers, retries=False)

    def close(self):
        """Close the session, if this client made it (a shared one is closed by its owner)."""
        if self._owns_session:
            self.session.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plumbing ---------------------------------------------------------

    def _url(self, *parts):
        return self.url + "/" + "/".join(quote(str(part), safe="") for part in parts)

    def request(self, method, path, json_body=None, params=None, timeout=None, attempts=None, idempotent=None):
        """Send one request, retrying transient failures; returns the decoded JSON (None if empty).

        ``path`` is a tuple of URL segments. A read timeout is retried only
        for idempotent requests, since the server may have acted on it. Every
        POST carries an ``Idempotency-Key`` (the same on each retry), so that
        a server that honours it (``POST /tasks``) does a retried POST once;
        callers pass ``idempotent=True`` for those.
        """
        url = self._url(*path) if isinstance(path, (tuple, list)) else self.url + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if query:
            url += "?" + urlencode(query, doseq=True)
        attempts = self.attempts if attempts is None else max(1, int(attempts))
        if idempotent is None:
            idempotent = method in _IDEMPOTENT
        changes = method not in _IDEMPOTENT
        headers = dict(self.session.headers)  # urllib3 takes a request's headers instead of the pool's
        if method == "POST":
            headers["Idempotency-Key"] = str(uuid.uuid4())
        timeout = self.timeout if timeout is None else timeout
        self._check_scheme()
        delay = self.backoff
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                response = self.session.request(
                    method, url, json=json_body, timeout=timeout, headers=headers, redirect=False
                )
            except ReadTimeoutError as exc:
                if not idempotent or last:
                    raise ServerUnreachable(
                        None,
                        f"{method} {url}: no answer within {timeout}s",
                        url=self.url,
                        reason=f"no answer within {timeout:g}s",
                        maybe_done=changes,
                    ) from exc
                log.info("%s %s timed out (attempt %d/%d)", method, url, attempt, attempts)
            except (HTTPError, OSError) as exc:  # refused, reset, cut short, timed out connecting
                if last or not (idempotent or _never_sent(exc)):
                    # a POST the server may have taken is not sent twice
                    raise ServerUnreachable(
                        None,
                        f"cannot reach {self.url}: {exc}",
                        url=self.url,
                        reason=_short_reason(exc) or type(exc).__name__,
                        maybe_done=changes and not _never_sent(exc),
                    ) from exc
                log.info("%s %s failed (attempt %d/%d): %s", method, url, attempt, attempts, exc)
            else:
                if response.status in _RETRY_STATUSES and (idempotent or response.status == 503):
                    # 502 and 504 come from a proxy that may have passed the request on
                    if last:
                        message = _error_message(response)[0]
                        raise ServerUnreachable(
                            response.status, message, url=self.url, reason=f"{response.status} {message}"
                        )
                    log.info("%s %s answered %s (attempt %d/%d)", method, url, response.status, attempt, attempts)
                else:
                    return _decode(method, url, response)
            self.sleep(delay)
            delay = min(self.max_backoff, delay * 2)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_scheme(self):
        """Once per client, for an ``https://`` URL: fail at once, with the
        fix, when the server speaks plain HTTP."""
        if self._scheme_checked:
            return
        parts = urlsplit(self.url)
        if _speaks_plain_http(parts.hostname, parts.port or 443):
            plain = "http://" + parts.netloc
            raise WrongScheme(
                None,
                f"{self.url} speaks plain HTTP, not HTTPS: use {plain}",
                url=self.url,
                reason=f"it speaks http, not https: use --server {plain}",
            )
        self._scheme_checked = True

    def get(self, *path, params=None, **kw):
        return self.request("GET", path, params=params, **kw)

    def post(self, *path, json_body=None, **kw):
        return self.request("POST", path, json_body=json_body, **kw)

    def patch(self, *path, json_body=None, **kw):
        return self.request("PATCH", path, json_body=json_body, **kw)

    def delete(self, *path, **kw):
        return self.request("DELETE", path, **kw)

    # -- workers ----------------------------------------------------------

    def register_worker(self, host, resources):
        """Register this machine; returns the new worker id."""
        return self.register(host, resources)["_id"]

    def register(self, host, resources):
        """Register this machine; returns the server's answer (the worker, with
        its ``_id`` and the server's ``heartbeat_timeout`` in seconds)."""
        return self.post("workers", json_body={"host": host, "resources": resources})

    def unregister_worker(self, wid):
        return self.delete("workers", wid)

    def claim(self, wid, free, max_tasks, wait=0, finished=None, prefetch=0):
        """Claim up to ``max_tasks`` ready tasks fitting ``free``; ``{"_items": [...], "cancel": [...]}``,
        and ``retry_after`` (seconds to let pass before claiming again) when
        the server could not hold the request open.

        ``finished``: reports of ended attempts to deliver first, in the same
        request (``[{"task": id, "attempt": n, "outcome": ..., ...}]``, as
        ``finish`` takes them); the answer's ``finished`` has a result for
        each, and ``max_tasks`` may then be 0 (report only). ``prefetch``:
        up to this many more tasks, beyond ``free``, that fit the worker's
        registered resources (held until a slot frees).
        Not retried after a read timeout: the server may have claimed tasks
        for us already.
        """
        body = {"free": free, "max_tasks": int(max_tasks), "wait": wait}
        if prefetch:
            body["prefetch"] = int(prefetch)
        if finished:
            body["finished"] = [_with_output(report) for report in finished]
        reply = (
            self.request(
                "POST",
                ("workers", wid, "claim"),
                json_body=body,
                timeout=self.timeout + float(wait or 0),
                idempotent=False,
            )
            or {}
        )
        reply.setdefault("_items", [])
        reply.setdefault("cancel", [])
        return reply

    def release(self, wid, tasks, prefetched=False):
        """Hand back claimed tasks (documents from a claim) that will not be
        started under registration ``wid``; the ids the server took back.
        ``prefetched``: tasks held beyond free slots and never started (their
        attempt is erased, see the claim's ``prefetch``)."""
        body: dict = {"tasks": [{"_id": t["_id"], "attempt": t["history"][-1]["attempt"]} for t in tasks]}
        if prefetched:
            body["prefetched"] = True
        reply = self.request("POST", ("workers", wid, "release"), json_body=body, idempotent=True) or {}
        return reply.get("released", [])

    def heartbeat(self, wid, tasks):
        """Report liveness, usage and progress; ``{"cancel": [...], "unknown": [...]}``."""
        reply = self.request("POST", ("workers", wid, "heartbeat"), json_body={"tasks": tasks}, idempotent=True) or {}
        reply.setdefault("cancel", [])
        reply.setdefault("unknown", [])
        return reply

    def finish(self, task_id, attempt, outcome, exit_code, stdout="", stderr="", usage=None):
        """Report the end of an attempt (repeating it is harmless: the server answers 409,
        or keeps a report of an attempt it gave up meanwhile as its ``late_report``)."""
        body = {
            "attempt": attempt,
            "outcome": outcome,
            "exit_code": exit_code,
            "usage": usage or {},
            **_output("stdout", stdout),
            **_output("stderr", stderr),
        }
        return self.request("POST", ("tasks", task_id, "finish"), json_body=body, idempotent=True)

    def list_workers(self, **params):
        return self.get("workers", params=params or None)

    def get_worker(self, wid):
        return self.get("workers", wid)

    # -- tasks ------------------------------------------------------------

    def submit(self, tasks, child=False, after_self=False):
        """POST one task (a dict) or several (a list); returns Eve's answer.
        Retried after a lost answer: the server does a keyed POST once.

        From inside a running task, ``child=True`` adds them to its job as
        its children: what runs after it waits for them too.
        ``after_self=True`` adds them to run after it (and nothing waits
        for them). Both read $BANYAN_TASK_ID, which the worker sets."""
        if child or after_self:
            task_id = running_task_id()
            docs = [tasks] if isinstance(tasks, dict) else list(tasks)
            docs = [dict(doc, added_by=task_id) for doc in docs]
            if after_self:
                docs = [dict(doc, after=list(doc.get("after") or []) + [task_id]) for doc in docs]
            tasks = docs[0] if isinstance(tasks, dict) else docs
        return self.post("tasks", json_body=tasks, idempotent=True)

    def get_task(self, task_id, projection=None):
        params = {"projection": json.dumps(projection)} if projection else None
        return self.get("tasks", task_id, params=params)

    def list_tasks(self, where=None, projection=None, sort=None, page=None, max_results=None):
        """One page of tasks, as Eve returns it (``_items``, ``_meta``, ``_links``)."""
        params: dict = {}
        if where:
            params["where"] = json.dumps(where) if not isinstance(where, str) else where
        if projection:
            params["projection"] = json.dumps(projection) if not isinstance(projection, str) else projection
        if sort:
            params["sort"] = json.dumps(sort) if not isinstance(sort, str) else sort
        if page:
            params["page"] = int(page)
        if max_results:
            params["max_results"] = int(max_results)
        return self.get("tasks", params=params or None)

    def iter_tasks(self, where=None, projection=None, sort=None, max_results=None):
        """Every matching task, page after page."""
        page = 1
        while True:
            reply = self.list_tasks(where, projection, sort, page, max_results)
            items = reply.get("_items", [])
            yield from items
            if not items or "next" not in reply.get("_links", {}):
                return
            page += 1

    def patch_task(self, task_id, updates):
        return self.patch("tasks", task_id, json_body=updates)

    def cancel(self, task_id):
        """Ask for cancellation (a running task becomes ``pending_cancellation``)."""
        return self.patch_task(task_id, {"state": TaskState.CANCELLED.value})

    def logs(self, task_id, attempt=None):
        params = {"attempt": int(attempt)} if attempt is not None else None
        return self.get("tasks", task_id, "logs", params=params)

    def create_tasks(self, docs):
        """POST tasks in one request (the server takes all or none); their ids, in order."""
        docs = list(docs)
        reply = self.post("tasks", json_body=docs, idempotent=True) or {}
        items = reply["_items"] if "_items" in reply else [reply]
        return [item["_id"] for item in items]

    def add_continuations(self, parents, children):
        """Make ``children`` (inactive tasks) continuations of every task in ``parents``."""
        body = [{"targets": list(parents), "values": list(children)}]
        return self.post("tasks", "add_continuations", json_body=body)

    def patch_tasks(self, updates):
        """Bulk PATCH ``[{"_id": id, <changes>}, ...]`` in one request.

        Returns one result per item, in order; a refused item's result has
        ``"_status": "ERR"`` and ``_error`` or ``_issues`` (see
        ``describe_result``) instead of raising for the whole batch.
        """
        updates = list(updates)
        if not updates:
            return []
        try:
            reply = self.patch("tasks", json_body=updates) or {}
        except BanyanError as exc:
            if isinstance(exc.payload, dict) and isinstance(exc.payload.get("_items"), list):
                return exc.payload["_items"]
            raise
        return reply.get("_items", [])

    def set_states(self, task_ids, state, chunk=500):
        """Ask for ``state`` on each task (bulk PATCHes of ``chunk``); one result per task."""
        task_ids, results = list(task_ids), []
        for start in range(0, len(task_ids), chunk):
            results += self.patch_tasks(
                [{"_id": task_id, "state": state} for task_id in task_ids[start : start + chunk]]
            )
        return results

    def tasks_by_id(self, task_ids, projection=None, chunk=200):
        """``{id: task}`` for those of ``task_ids`` that exist (and the caller may see)."""
        found = {}
        task_ids = list(dict.fromkeys(task_ids))
        for start in range(0, len(task_ids), chunk):
            part = task_ids[start : start + chunk]
            for doc in self.iter_tasks({"_id": {"$in": part}}, projection, max_results=len(part)):
                found[doc["_id"]] = doc
        return found

    def wait_unfinished(self, task_ids, timeout, outcomes=False):
        """Hold until none of ``task_ids`` is unfinished, or ``timeout`` seconds;
        ``{"unfinished": {id: state}, "waited": bool}`` (``POST /tasks/wait``).
        ``waited`` is false when the server was too busy to hold the request.
        ``outcomes``: the answer also has ``finished``, ``{id: {name, state,
        exit_status, current_history, cancelled_by}}`` of the finished ones."""
        body = {"ids": list(task_ids), "timeout": timeout}
        if outcomes:
            body["outcomes"] = True
        return self.request(
            "POST",
            ("tasks", "wait"),
            json_body=body,
            timeout=self.timeout + float(timeout),
            idempotent=True,
        )

    def stats(self):
        """Task statistics (``GET /stats``)."""
        return self.get("stats")

    def worker_stats(self):
        """Per-worker load (``GET /stats/workers``)."""
        return self.get("stats", "workers")

    def submit_graph(self, graph, after=(), **kwargs):
        """Submit a ``banyan.graph.TaskGraph`` so that it runs (after ``after``,
        task ids; also ``after_any``, ``after_failure``, ``job``, ``name``,
        ``array_limit``, see ``banyan.graph.submit_graph``)."""
        from banyan.graph import submit_graph

        return submit_graph(self, graph, after=after, **kwargs)

    # -- jobs, retry, hold ------------------------------------------------

    def create_job(self, name=None, array_limit=None, max_tasks=None, max_depth=None):
        """A new job (``POST /jobs``) for tasks submitted with ``job``; its id.
        ``max_tasks`` and ``max_depth`` cap what its running tasks may add
        (tasks in all, and how deep children of children nest)."""
        body = {"name": name}
        if array_limit:
            body["array_limit"] = int(array_limit)
        for key, value in (("max_tasks", max_tasks), ("max_depth", max_depth)):
            if value is not None:
                body[key] = int(value)
        return self.post("jobs", json_body=body, idempotent=True)["_id"]

    def get_job(self, job_id):
        """A job with its ``counts`` of tasks (queued, running, succeeded, failed, cancelled, total)."""
        return self.get("jobs", job_id)

    def iter_jobs(self, where=None, sort="_id"):
        page = 1
        while True:
            params = {"page": page, "max_results": 1000, "sort": sort}
            if where:
                params["where"] = json.dumps(where)
            reply = self.get("jobs", params=params) or {}
            items = reply.get("_items", [])
            yield from items
            if not items or "next" not in reply.get("_links", {}):
                return
            page += 1

    def retry(self, task_ids, chunk=1000):
        """Put finished tasks that did not succeed back in the queue (new
        attempts); the tasks cancelled because of them come back too. One
        result per task (see ``describe_result``)."""
        task_ids, results = list(task_ids), []
        for start in range(0, len(task_ids), chunk):
            body = {"ids": task_ids[start : start + chunk]}
            try:
                reply = self.request("POST", ("tasks", "retry"), json_body=body, idempotent=True) or {}
            except BanyanError as exc:
                if isinstance(exc.payload, dict) and isinstance(exc.payload.get("_items"), list):
                    reply = exc.payload
                else:
                    raise
            results += reply.get("_items", [])
        return results

    def hold(self, task_ids, held=True, chunk=500):
        """Hold queued tasks (never claimed until released), or release them; one result per task."""
        task_ids, results = list(task_ids), []
        for start in range(0, len(task_ids), chunk):
            results += self.patch_tasks(
                [{"_id": task_id, "held": bool(held)} for task_id in task_ids[start : start + chunk]]
            )
        return results

    def wait(self, task_ids, **kwargs):
        """Block until every task has finished; a ``banyan.waiting.WaitResult``."""
        from banyan.waiting import wait_for

        return wait_for(self, task_ids, **kwargs)


def _with_output(report):
    """A finish report with its output as the API takes it (see ``_output``)."""
    report = dict(report)
    for name in ("stdout", "stderr"):
        if name in report:
            report.update(_output(name, report.pop(name)))
    return report


def _output(name, data):
    """An attempt's output for a finish report: text as ``name``; bytes that
    are not UTF-8 as ``name_base64``, so the server keeps them exactly."""
    if isinstance(data, bytes):
        try:
            return {name: data.decode("utf-8")}
        except UnicodeDecodeError:
            return {name + "_base64": base64.b64encode(data).decode("ascii")}
    return {name: data or ""}


def _error_message(response):
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("_error")
        if isinstance(error, dict):
            message = error.get("message")
        else:
            message = error
        return (
            message or body.get("message") or response.reason or f"HTTP {response.status}",
            body.get("_issues"),
            body,
        )
    text = response.data.decode("utf-8", "replace").strip()
    return (text[:500] or response.reason or f"HTTP {response.status}", None, body)


def _decode(method, url, response):
    if response.status >= 400:
        message, issues, body = _error_message(response)
        log.debug("%s %s -> %s %s", method, url, response.status, message)
        raise BanyanError(response.status, message, issues, body)
    if response.status == 204 or not response.data:
        return None
    try:
        return response.json()
    except ValueError:
        raise BanyanError(response.status, f"{method} {url}: answer is not JSON") from None
