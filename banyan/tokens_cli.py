"""`banyan token create|revoke|list`: manage tokens.

Two ways to reach the tokens:

- through a running server (`--server URL --token ADMIN_TOKEN`, or
  BANYAN_SERVER / BANYAN_TOKEN): the admin endpoint `/tokens`;
- directly in the store (`--data-dir DIR` or `--mongo-uri URI`), with no
  server needed: that is how the first admin token can be made. The
  embedded store belongs to one process at a time, so while a server runs on
  that data directory this way is refused and the server must be used.

`create` prints the token alone on stdout (so `T=$(banyan token create ...)`
works); it is shown only then, since the store keeps only its hash.
"""

import os
import sys

from banyan.protocol import ROLES


def add_token_parser(sub):
    token = sub.add_parser(
        "token",
        help="create, revoke and list tokens",
        description="Create, revoke and list access tokens (admin, user, worker).",
    )
    actions = token.add_subparsers(dest="token_command", metavar="ACTION")
    actions.required = True

    create = actions.add_parser(
        "create",
        help="make a token (printed once)",
        description="Make a token. It is printed once, on stdout; the server keeps only its hash.",
    )
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", help="who it is for; a user's tasks belong to this name (default: ROLE-<random>)")
    _where(create)
    create.set_defaults(func=run_create)

    revoke = actions.add_parser("revoke", help="revoke a token by id, or every token of a name")
    revoke.add_argument("id_or_name", metavar="ID|NAME")
    _where(revoke)
    revoke.set_defaults(func=run_revoke)

    listing = actions.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    _where(listing)
    listing.set_defaults(func=run_list)
    return token


def _where(parser):
    group = parser.add_argument_group("where the tokens are")
    group.add_argument(
        "--server",
        default=os.environ.get("BANYAN_SERVER"),
        help="a running server's URL (default $BANYAN_SERVER); needs an admin --token",
    )
    group.add_argument(
        "--token", default=os.environ.get("BANYAN_TOKEN"), help="an admin token for --server (default $BANYAN_TOKEN)"
    )
    group.add_argument(
        "--data-dir",
        default=None,
        help="the embedded store's directory, used directly while no server runs on it "
        "(default $BANYAN_DATA_DIR or ~/.banyan)",
    )
    group.add_argument("--mongo-uri", default=None, help="a MongoDB URI, used directly (default $BANYAN_MONGO_URI)")


class _Failure(Exception):
    pass


class _DirectTokens:
    """Tokens straight from the store."""

    def __init__(self, args):
        from banyan.server.app import default_config
        from banyan.server.auth import TokenStore
        from banyan.server.serve import DEFAULT_DATA_DIR, database_config
        from banyan.server.store import connect

        mongo_uri = args.mongo_uri or (None if args.data_dir else os.environ.get("BANYAN_MONGO_URI"))
        data_dir = None
        if not mongo_uri:
            data_dir = os.path.expanduser(args.data_dir or os.environ.get("BANYAN_DATA_DIR", DEFAULT_DATA_DIR))
            if not args.data_dir and not os.path.isdir(data_dir):
                # A token made in a store no server uses would be refused everywhere.
                raise _Failure(
                    "no server given (--server, BANYAN_SERVER or the config file) and no store "
                    "in %s: give --server URL --token ADMIN_TOKEN, or --data-dir of the "
                    "server's store" % data_dir
                )
        try:
            self.client = connect(mongo_uri=mongo_uri, data_dir=data_dir)
        except RuntimeError as e:
            raise _Failure(
                "%s.\nA server is running on it: manage tokens through it with "
                "--server URL --token ADMIN_TOKEN (its first admin token is in "
                "%s unless it was revoked)." % (e, os.path.join(data_dir or "DATA_DIR", "admin.token"))
            ) from e
        dbname = database_config(mongo_uri).get("MONGO_DBNAME") or default_config()["MONGO_DBNAME"]
        self.store = TokenStore(self.client[dbname])

    def create(self, role, name):
        from banyan.server.auth import TokenError

        try:
            return self.store.create(role, name)
        except TokenError as e:
            raise _Failure(str(e)) from e

    def revoke(self, id_or_name):
        from banyan.server.auth import TokenError

        try:
            return self.store.revoke(id_or_name)
        except TokenError as e:
            raise _Failure(str(e)) from e

    def list(self, include_revoked):
        return self.store.list(include_revoked)

    def close(self):
        self.client.close()


class _HttpTokens:
    """Tokens through a running server's admin endpoint."""

    def __init__(self, args):
        from banyan.client import Client

        if not args.token:
            raise _Failure("--server needs an admin token: --token TOKEN or BANYAN_TOKEN")
        self.client = Client(args.server, token=args.token, attempts=2)

    def _call(self, method, *path, **kw):
        from banyan.errors import BanyanError

        try:
            return self.client.request(method, path, **kw)
        except BanyanError as e:
            raise _Failure(e.describe()) from e

    def create(self, role, name):
        body = {"role": role}
        if name is not None:
            body["name"] = name
        reply = self._call("POST", "tokens", json_body=body, idempotent=False, attempts=1)
        token = reply.pop("token")
        reply.pop("_status", None)
        return reply, token

    def revoke(self, id_or_name):
        return self._call("DELETE", "tokens", id_or_name)["_items"]

    def list(self, include_revoked):
        params = {"revoked": "1"} if include_revoked else None
        return self._call("GET", "tokens", params=params)["_items"]

    def close(self):
        self.client.close()


def _open(args):
    if not (args.data_dir or args.mongo_uri or args.server):
        # no place given: the server (and token) of the config file, if it names one
        from banyan.config import resolve

        found = resolve(token=args.token)
        if found.server_source != "default":
            args.server, args.token = found.server, found.token
    direct = args.data_dir or args.mongo_uri or not args.server
    return _DirectTokens(args) if direct else _HttpTokens(args)


def _run(args, action):
    try:
        tokens = _open(args)
        try:
            return action(tokens)
        finally:
            tokens.close()
    except _Failure as e:
        print("banyan token: %s" % e, file=sys.stderr)
        return 1


def run_create(args):
    def action(tokens):
        doc, token = tokens.create(args.role, args.name)
        print(token, flush=True)
        print(
            "created %s token %r (id %s); it is shown only now, so keep it safe"
            % (doc["role"], doc["name"], doc["_id"]),
            file=sys.stderr,
        )
        return 0

    return _run(args, action)


def run_revoke(args):
    def action(tokens):
        for doc in tokens.revoke(args.id_or_name):
            print("revoked %s token %r (id %s)" % (doc["role"], doc["name"], doc["_id"]))
        return 0

    return _run(args, action)


def run_list(args):
    def action(tokens):
        rows = [
            (d["_id"], d["role"], d["name"], str(d.get("created") or ""), str(d.get("revoked") or ""))
            for d in tokens.list(args.all)
        ]
        header = ("ID", "ROLE", "NAME", "CREATED", "REVOKED")
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        return 0

    return _run(args, action)
