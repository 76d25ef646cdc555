"""`banyan store check|repair DIR`: look at and mend an embedded store's files.

`check` reads the data directory (also while a server runs on it) and says
what each file holds, where any damage is, and whether the store will open.
`repair` needs the directory to itself (no server running): it rewrites each
damaged file with every valid record it holds, keeps the original beside it
(`journal.bnj.damaged-<time>`), and reports what it could not salvage.
"""

import os
import sys

EXIT_DAMAGED = 1


def add_store_parser(sub):
    store = sub.add_parser(
        "store",
        help="check or repair an embedded store's files",
        description="Check or repair the files of an embedded store (the data "
        "directory of `banyan server` without --mongo-uri).",
    )
    actions = store.add_subparsers(dest="store_command", metavar="ACTION")
    actions.required = True
    check = actions.add_parser(
        "check",
        help="report damage; exit 1 if the store would refuse to start",
        description="Read every record of DIR's snapshot and journal and report what each holds, "
        "any damaged record (file and offset) and whether the store opens. Exit status: "
        "0 it opens (a torn last record is dropped at start), 1 it would refuse to start.",
    )
    check.add_argument("data_dir", metavar="DIR")
    check.set_defaults(func=run_check)
    repair = actions.add_parser(
        "repair",
        help="salvage every valid record of damaged files (keeps the originals)",
        description="Rewrite each damaged file of DIR with every valid record it holds; the original "
        "is kept as FILE.damaged-<time>. Reports what could not be salvaged. Stop the "
        "server first.",
    )
    repair.add_argument("data_dir", metavar="DIR")
    repair.set_defaults(func=run_repair)
    archive = actions.add_parser(
        "archive",
        help="move finished tasks out of the live store into compressed files",
        description="Move the tasks that finished before DATE, and that nothing unfinished depends on, "
        "out of DIR's live store into DIR/archive/tasks-<time>.jsonl.gz (one task per line, "
        "as the API shows it); `banyan ls --archive DIR` lists them. Stop the server first.",
    )
    archive.add_argument(
        "--before",
        required=True,
        metavar="DATE",
        help="a date (2026-12-01 or 2026-12-01T10:00, local time unless a zone is given) or a duration ago (30d)",
    )
    archive.add_argument("data_dir", metavar="DIR")
    archive.set_defaults(func=run_archive)


def _data_dir(args):
    path = os.path.expanduser(args.data_dir)
    if not os.path.isdir(path):
        raise FileNotFoundError("no data directory at %s" % path)
    return path


def run_check(args):
    from banyan.store import journal

    lines, starts = journal.check(_data_dir(args))
    print("\n".join(lines))
    return 0 if starts else EXIT_DAMAGED


def run_repair(args):
    from banyan.store import journal

    path = _data_dir(args)
    lines = journal.repair(path)
    print("\n".join(lines))
    lines, starts = journal.check(path)
    if not starts:
        print("\n".join(lines), file=sys.stderr)
        return EXIT_DAMAGED
    return 0


def run_archive(args):
    from banyan.commands.listing import parse_since
    from banyan.server.store import DEFAULT_DATABASE, EmbeddedClient
    from banyan.store import archive

    before = parse_since(args.before)
    client = EmbeddedClient(_data_dir(args))
    try:
        count, path = archive.archive(client[DEFAULT_DATABASE], client.data_dir, before)
    finally:
        client.close()
    if path:
        print("archived %d finished task%s to %s" % (count, "s" * (count != 1), path))
    else:
        print(
            "no task to archive (finished before %s, with nothing unfinished depending on it)"
            % before.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    return 0
