"""Where the `banyan` command finds its server and token.

Each setting is looked up on its own, first found wins:

1. the flag (`--server URL`, `--token TOKEN`);
2. the environment (`BANYAN_SERVER`, `BANYAN_TOKEN`);
3. the config file, `$XDG_CONFIG_HOME/banyan/config.toml` (by default
   `~/.config/banyan/config.toml`), or the file `BANYAN_CONFIG` names::

       server = "http://queue.example.org:5000"
       token = "byn_..."

4. the default: `http://127.0.0.1:5000` and no token (what `banyan up` serves).
"""

import os

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib
from dataclasses import dataclass
from typing import Optional

__all__ = ["DEFAULT_SERVER", "ConfigError", "Connection", "config_path", "load_config", "resolve"]

DEFAULT_SERVER = "http://127.0.0.1:5000"
KEYS = ("server", "token")


class ConfigError(Exception):
    """The config file exists but cannot be used (the message names it)."""


@dataclass(frozen=True)
class Connection:
    server: str
    token: Optional[str]
    #: where each came from: "flag", "environment", the config file's path, or "default"
    server_source: str
    token_source: Optional[str]


def config_path(env=None):
    env = os.environ if env is None else env
    if env.get("BANYAN_CONFIG"):
        return os.path.expanduser(env["BANYAN_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "banyan", "config.toml")


def load_config(path):
    """The settings of the config file at `path` ({} when there is none)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("%s is not valid TOML: %s" % (path, exc)) from None
    for key in KEYS:
        if key in data and not isinstance(data[key], str):
            raise ConfigError("%s: '%s' must be a string" % (path, key))
    return {key: data[key] for key in KEYS if data.get(key)}


def resolve(server=None, token=None, env=None):
    """The server URL and token to use, from flags, then environment, then file."""
    env = os.environ if env is None else env
    values, sources = {}, {}
    flags = {"server": server, "token": token}
    needed = []
    for key in KEYS:
        if flags[key]:
            values[key], sources[key] = flags[key], "flag"
        elif env.get("BANYAN_" + key.upper()):
            values[key], sources[key] = env["BANYAN_" + key.upper()], "environment"
        else:
            needed.append(key)
    if needed:
        path = config_path(env)
        from_file = load_config(path)
        for key in needed:
            if key in from_file:
                values[key], sources[key] = from_file[key], path
    if "server" not in values:
        values["server"], sources["server"] = DEFAULT_SERVER, "default"
    return Connection(values["server"], values.get("token"), sources["server"], sources.get("token"))
