"""The front door: everything public is importable from ``cloche`` and listed in ``__all__``."""

from __future__ import annotations

import subprocess
import sys

import cloche
from cloche import errors

# the subpackages a user reaches through the front door (the others are implementation)
PUBLIC_MODULES = {"data", "errors", "experiments"}


def test_all_is_exactly_the_public_names():
    public = {n for n in vars(cloche) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(cloche, n)).__name__ == "module"}
    assert set(cloche.__all__) == (public - modules) | PUBLIC_MODULES
    assert len(cloche.__all__) == len(set(cloche.__all__))
    for name in cloche.__all__:
        assert hasattr(cloche, name), name


def test_error_hierarchy():
    assert issubclass(errors.UnknownProbePoint, errors.UsageError)
    assert issubclass(errors.UnknownProbePoint, KeyError)
    assert issubclass(errors.UsageError, ValueError)
    assert issubclass(errors.AuthError, errors.ConnectionError)
    assert issubclass(errors.FrameTooLarge, errors.ProtocolError)
    assert issubclass(errors.ProbeError, errors.UserCodeError)
    assert issubclass(errors.CallError, errors.UserCodeError)
    assert not issubclass(errors.CallError, errors.ProbeError)
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
