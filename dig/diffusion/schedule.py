"""Noise schedules and timestep respacing (which steps of the training process a sampler visits)."""
from __future__ import annotations

import math

import numpy as np


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """float64 betas for `num_timesteps` steps.

    "linear": Ho et al.'s 1e-4 … 0.02 over 1000 steps, scaled by 1000/T so other step counts describe the same
    process (what DiT trains with). "squaredcos_cap_v2": the cosine alpha-bar schedule of Nichol & Dhariwal.
    """
    if num_timesteps < 2:
        raise ValueError(f"a diffusion needs at least 2 timesteps, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_timesteps + 1) / num_timesteps
        return np.array([min(1 - alpha_bar(b) / alpha_bar(a), 0.999) for a, b in zip(steps[:-1], steps[1:])])
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'squaredcos_cap_v2'")


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """The sorted original timesteps a respaced sampler keeps.

    "" or None           -> all of them
    "ddimN"              -> the fixed integer stride of the DDIM paper giving exactly N steps (0, s, 2s, …)
    "N" or "N1,N2,…"     -> the process is cut into len(list) equal sections; section i keeps Ni evenly
                            spaced steps, first and last of the section included
    """
    if spacing in ("", None):
        return list(range(num_timesteps))
    spacing = str(spacing).strip()
    if spacing.startswith("ddim"):
        count = _parse_count(spacing[len("ddim"):], spacing)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"{spacing!r}: no integer stride gives exactly {count} of {num_timesteps} steps")

    counts = [_parse_count(part, spacing) for part in spacing.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(f"{spacing!r}: cannot take {count} steps from a section of {section}")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        # Accumulate the fractional stride (rather than i * stride) so rounding matches DiT's kept steps exactly.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += section
    return sorted(set(kept))


def _parse_count(text: str, spacing: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"bad timestep respacing {spacing!r}: expected '', 'ddimN', 'N' or 'N1,N2,…'") from None
    if count < 1:
        raise ValueError(f"bad timestep respacing {spacing!r}: step counts must be positive")
    return count
