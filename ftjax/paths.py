"""Where ftjax's shipped files live: `configs/`, the quickstart base, the data samples.

Relative paths in commands and configs (`configs/quickstart.py`,
`experiments/quickstart_base/model.safetensors`) are looked up in the current directory first,
then under the ftjax root, so the `ftjax` command runs the same experiments from any directory.
The root is, in order: `$FTJAX_ROOT`; the source checkout the package was imported from (a
`pip install -e .` or running inside the repository); `<prefix>/share/ftjax`, where a
non-editable `pip install .` puts the configs and shipped assets.
"""
from __future__ import annotations

import os
import sys

__all__ = ["root", "resolve", "ENV_VAR"]

ENV_VAR = "FTJAX_ROOT"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _candidates() -> list[str]:
    env = os.environ.get(ENV_VAR)
    out = [env] if env else []
    out.append(os.path.dirname(_PACKAGE_DIR))  # the checkout (editable install / repo)
    out.append(os.path.join(sys.prefix, "share", "ftjax"))  # non-editable install
    return out


def root() -> str:
    """The first candidate root that holds `configs/`; raises naming the places looked at."""
    for cand in _candidates():
        if os.path.isdir(os.path.join(cand, "configs")):
            return os.path.abspath(cand)
    raise FileNotFoundError(
        f"cannot find ftjax's configs/ directory (looked in {_candidates()}); set "
        f"{ENV_VAR} to the ftjax checkout")


def resolve(path: str) -> str:
    """`path` if it exists (or is absolute or a URL); else the same relative path under `root()`.

    Returns `path` unchanged when neither exists, so the caller's error names what was given.
    """
    expanded = os.path.expanduser(path)
    if "://" in path or os.path.isabs(expanded) or os.path.exists(expanded):
        return expanded
    try:
        candidate = os.path.join(root(), expanded)
    except FileNotFoundError:
        return expanded
    return candidate if os.path.exists(candidate) else expanded
