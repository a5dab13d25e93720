"""The front door: everything public is importable from ``cloche`` and listed in ``__all__``."""

from __future__ import annotations

import subprocess
import sys

import cloche
from cloche import errors


def test_all_is_complete_and_importable():
    public = {n for n in dir(cloche) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(cloche, n)).__name__ == "module"}
    assert public - modules - {"annotations"} <= set(cloche.__all__) | {"errors"}
    for name in cloche.__all__:
        assert hasattr(cloche, name), name


def test_error_hierarchy():
    assert issubclass(errors.UnknownProbePoint, errors.UsageError)
    assert issubclass(errors.UnknownProbePoint, KeyError)
    assert issubclass(errors.UsageError, ValueError)
    assert issubclass(errors.AuthError, errors.ConnectionError)
    assert issubclass(errors.FrameTooLarge, errors.ProtocolError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ClocheError)
    err = errors.ProbeError("probe f at 'x' raised", point="x", probe="f", request_id=3, rank=1,
                            remote_traceback="Traceback ...\nValueError: bad")
    text = str(err)
    assert "request 3" in text and "rank 1" in text and "ValueError: bad" in text


def test_import_has_no_side_effects():
    code = ("import threading, sys; before = threading.active_count(); hook = sys.excepthook;"
            "import cloche; assert threading.active_count() == before; assert sys.excepthook is hook")
    subprocess.run([sys.executable, "-c", code], check=True)
