"""Site settings: one Python file with the settings a site changes, applied
on top of the package's defaults (`banyan.settings`).

`banyan server --settings PATH` loads it; run from a checkout, the
repository's top-level `settings.py` is the default. Its upper-case names
apply as follows: `DOMAIN` resource by resource, and within a resource
`schema` field by field (a site adds fields or redefines one, the others
keep the package's definition); `VIRTUAL_RESOURCES` entry by entry (a new
entry gets its endpoints, as the package's own do); any other name (a limit
such as `LOG_CAP`) replaces the default. Flags given to `banyan server` win
over the file. Imports nothing of the server, so `banyan --help` stays quick.
"""

import copy
import os
import runpy

#: The repository's root when Banyan runs from a checkout (banyan/server/ is two levels down).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SiteSettingsError(ValueError):
    """The file cannot be read, or a setting does not have the shape it needs."""


def default_path():
    """The repository's `settings.py` when Banyan runs from a checkout
    (a `pyproject.toml` next to it), else None (an installed package)."""
    path = os.path.join(_ROOT, "settings.py")
    if os.path.isfile(path) and os.path.isfile(os.path.join(_ROOT, "pyproject.toml")):
        return path
    return None


def load(path):
    """The upper-case names the Python file `path` defines."""
    try:
        namespace = runpy.run_path(path)
    except OSError as e:
        raise SiteSettingsError("cannot read the site settings %s: %s" % (path, e)) from e
    except Exception as e:  # the site's own code: say where it failed
        raise SiteSettingsError("the site settings %s fail: %s (%s)" % (path, e, type(e).__name__)) from e
    return {name: value for name, value in namespace.items() if name.isupper()}


def apply(settings, site, path="the site settings"):
    """Apply `site` (names -> values, as `load` returns them) over `settings`
    in place, and return `settings`."""
    for name, value in site.items():
        if name in ("DOMAIN", "VIRTUAL_RESOURCES") and not isinstance(value, dict):
            raise SiteSettingsError("%s: %s must be a dict, not %s" % (path, name, type(value).__name__))
        value = copy.deepcopy(value)
        if name == "DOMAIN":
            for resource, spec in value.items():
                if not isinstance(spec, dict):
                    raise SiteSettingsError("%s: DOMAIN[%r] must be a dict" % (path, resource))
                current = settings["DOMAIN"].setdefault(resource, {})
                for key, item in spec.items():
                    if key == "schema" and isinstance(item, dict):
                        current.setdefault("schema", {}).update(item)
                    else:
                        current[key] = item
        elif name == "VIRTUAL_RESOURCES":
            settings.setdefault(name, {}).update(value)
        else:
            settings[name] = value
    return settings
