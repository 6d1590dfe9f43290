"""Processes that die with the process that started them, however it ended (SIGKILL included).

Linux's PR_SET_PDEATHSIG: the kernel sends a signal to this process when its parent exits. It survives exec, so a
launcher can set it in the child (Popen's preexec_fn) or the child can set it itself. Elsewhere it does nothing."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits. With `expected_parent`, a parent that
    is already gone (it died before the call) is handled too: this process gets `sig` at once. Returns whether the
    request took effect (False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True


def child_dies_with_us(sig: int = signal.SIGKILL):
    """A Popen `preexec_fn`: the child gets `sig` when the calling process exits."""
    parent = os.getpid()
    return lambda: die_with_parent(sig, parent)
