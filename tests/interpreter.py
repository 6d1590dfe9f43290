"""Runs a worker script of this folder under Triton's CPU interpreter, in a subprocess: Triton decides between
interpreted and compiled kernels when a kernel module is imported, and GPU tests in the same pytest session need
compiled ones. The worker reads its cases from IN and writes its results to OUT (torch.save files)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_interpreted(worker: str, cases, folder: Path, timeout: int = 600):
    """torch.save(cases) -> `TRITON_INTERPRET=1 python tests/<worker> IN OUT` -> torch.load(OUT)."""
    torch.save(cases, folder / "in.pt")
    root = str(Path(__file__).parents[1])  # this checkout's dig first (an editable install may point elsewhere)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(worker)), str(folder / "in.pt"),
                           str(folder / "out.pt")], env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(folder / "out.pt")
