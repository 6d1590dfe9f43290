"""The trainer's host settings (dig/train/host_pacing.py): which collections run when, that cyclic garbage is still
freed, and that Python's own settings come back afterwards."""
from __future__ import annotations

import gc
import sys
import weakref

import pytest

from dig.train.host_pacing import FULL_EVERY, HostPacing


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def gc_runs():
    """Generations of the collections that run while the test does, in order (gc.callbacks)."""
    seen: list[int] = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)


def test_collections_run_at_step_boundaries_only(gc_runs):
    before = (gc.isenabled(), sys.getswitchinterval())
    pacing = HostPacing(gc_every=3, gil_switch_interval_ms=0.25)
    with pacing:
        assert not gc.isenabled()
        assert sys.getswitchinterval() == pytest.approx(0.25e-3)
        gc_runs.clear()  # the clean start's own full collection
        # far more allocations than the automatic threshold (700 by default): none may trigger a collection
        garbage = weakref.ref(_Node())
        junk = [[] for _ in range(20_000)]
        del junk
        assert gc_runs == []
        assert garbage() is not None  # a cycle survives until the paced collection...
        for step in range(1, 3 * FULL_EVERY + 1):
            pacing.step_done(step)
            if step == 2:
                assert gc_runs == [] and garbage() is not None
            if step == 3:
                assert gc_runs == [1] and garbage() is None  # ...which frees it
        expected = [2 if s % (3 * FULL_EVERY) == 0 else 1 for s in range(3, 3 * FULL_EVERY + 1, 3)]
        assert gc_runs == expected
    assert (gc.isenabled(), sys.getswitchinterval()) == before


def test_zero_leaves_pythons_own_collection():
    before = (gc.isenabled(), sys.getswitchinterval())
    with HostPacing(gc_every=0, gil_switch_interval_ms=None) as pacing:
        assert (gc.isenabled(), sys.getswitchinterval()) == before
        pacing.step_done(50)
    assert (gc.isenabled(), sys.getswitchinterval()) == before


def test_settings_come_back_when_training_fails():
    before = (gc.isenabled(), sys.getswitchinterval())
    with pytest.raises(RuntimeError):
        with HostPacing(gc_every=10, gil_switch_interval_ms=1.0):
            raise RuntimeError("a step failed")
    assert (gc.isenabled(), sys.getswitchinterval()) == before


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="gc_every must be >= 0"):
        HostPacing(gc_every=-1, gil_switch_interval_ms=None)
