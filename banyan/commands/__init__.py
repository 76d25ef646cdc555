"""The `banyan` subcommands that talk to a server, one module each.

Each module has `register(sub)`, which adds its subcommand(s) to the
`banyan` parser with a `func(args)` returning the exit code; failures are
raised (`base.CommandError`, `banyan.client.BanyanError`) and turned into one
line on stderr by `banyan.cli.main`.
"""

from banyan.commands import cancel, cluster, control, jobs, listing, logs, progress, submit, wait

MODULES = (submit, listing, jobs, cancel, control, wait, logs, cluster, progress)


def register_all(sub):
    for module in MODULES:
        module.register(sub)
