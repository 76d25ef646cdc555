"""Banyan: a simple distributed job submission system.

``banyan.Client(url, token)`` is the Python client of the HTTP API (the
``banyan`` command and the worker use it too)::

    import banyan
    client = banyan.Client("http://127.0.0.1:5000", token=None)
    ids = client.create_tasks([{"command": "echo hi", "state": "available"}])
    result = client.wait(ids)
    print(result.failed)
"""

__version__ = "0.1.0"

__all__ = ["Client", "BanyanError", "ServerUnreachable", "__version__"]


def __getattr__(name):
    # Imported on first use, so that `import banyan.units` (the server, the
    # worker) does not pull in requests.
    if name in ("Client", "BanyanError", "ServerUnreachable"):
        from banyan import client

        return getattr(client, name)
    raise AttributeError("module 'banyan' has no attribute %r" % name)
