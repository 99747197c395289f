"""Make the whole `matplotlib` package unimportable, as on an install without it.

`block()` drops every loaded `matplotlib` / `matplotlib.*` module and puts a finder first
on `sys.meta_path` that refuses them all, so any `import matplotlib...` raises
ModuleNotFoundError. Used in-process (the `no_matplotlib` fixture) and in subprocesses
(`python -c "import no_matplotlib; no_matplotlib.block(); ..."`).
"""

from __future__ import annotations

import importlib.abc
import sys

PACKAGE = "matplotlib"


def _blocked(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if _blocked(fullname):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by tests/no_matplotlib.py)", name=fullname)
        return None


def block() -> Blocker:
    """Unload matplotlib and block it; returns the finder (remove it to undo, see `unblock`)."""
    for name in [n for n in sys.modules if _blocked(n)]:
        del sys.modules[name]
    finder = Blocker()
    sys.meta_path.insert(0, finder)
    return finder


def unblock(finder: Blocker, saved: dict) -> None:
    """Remove `finder` and put back the matplotlib modules of `saved` (a copy of sys.modules)."""
    sys.meta_path.remove(finder)
    for name in [n for n in sys.modules if _blocked(n)]:
        del sys.modules[name]
    sys.modules.update({n: m for n, m in saved.items() if _blocked(n)})
