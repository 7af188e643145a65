"""What the three adapters share (`_torch_internals.py`, `_ultralytics_internals.py`,
`strategies/_deepspeed_internals.py`): the error raised when an installed library no longer has an internal that
parallel_yolo relies on, naming it, the installed version and the versions the suite was run against.

Every use of a library name that is not public API lives in one of those adapters; each has a test
(tests/test_torch_internals.py, tests/test_ultralytics_internals.py, tests/strategies/test_deepspeed_internals.py)
that fails with this message when a release moves it, instead of training going on with wrong ranges or weights.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

__all__ = ["LibraryChanged", "TESTED", "require", "changed"]

TESTED = {"torch": ">=2.11,<2.15", "deepspeed": ">=0.19.8,<0.20", "accelerate": ">=1.15,<2",
          "ultralytics": ">=8.4.190,<8.5"}
"""The ranges the suite was run against: setup.py pins the same (tests/test_torch_internals.py checks)."""


class LibraryChanged(RuntimeError):
    """An installed library moved or changed an internal that parallel_yolo relies on."""


def changed(library: str, what: str, why: str) -> LibraryChanged:
    try:
        version = metadata.version(library)
    except metadata.PackageNotFoundError:
        version = "(version unknown)"
    return LibraryChanged(f"{library} {version} no longer has {what}, which parallel_yolo needs ({why}); the suite "
                          f"ran against {library}{TESTED[library]}: install a version in that range, or update the "
                          f"{library} adapter and its test")


def require(obj: Any, name: str, library: str, why: str) -> Any:
    """`obj.name`, or LibraryChanged naming it."""
    try:
        return getattr(obj, name)
    except AttributeError:
        owner = getattr(obj, "__name__", None) or type(obj).__name__
        raise changed(library, f"{owner}.{name}", why) from None
