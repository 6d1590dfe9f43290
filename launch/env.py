"""The environment a run needs on every node: which variables are forwarded, and the safe NCCL defaults."""
from __future__ import annotations

from typing import Mapping

# Prefixes of variables that every rank (or the Ray job) needs: storage credentials and endpoints, MLflow
# tracking, collective-communication tuning, Hugging Face cache location, torch's allocator settings
# (PYTORCH_CUDA_ALLOC_CONF), and the project's own settings.
FORWARDED_PREFIXES = ("AWS_", "MLFLOW_", "NCCL_", "HF_", "DIG_", "TORCH_", "PYTORCH_", "NVSHMEM_", "DS_", "OMP_")

# NVLink multicast (NVLS) stays off: on shared or partitioned GPU hosts it can hang collectives or fail to
# allocate. Users may still override each one explicitly in their environment.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

_SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "SESSION", "KEY_ID", "CREDENTIAL")


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to pass to every rank: the forwarded prefixes from `environ`, plus the multicast defaults
    for any of them the user did not set."""
    out = {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES)}
    for k, v in MULTICAST_OFF.items():
        out.setdefault(k, v)
    return dict(sorted(out.items()))


def is_secret(name: str) -> bool:
    return any(marker in name.upper() for marker in _SECRET_MARKERS)


def describe(env: Mapping[str, str]) -> str:
    """`K=V` pairs for a log line, with credential values masked."""
    return " ".join(f"{k}={'***' if is_secret(k) else v}" for k, v in env.items())
