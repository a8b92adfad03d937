"""Device-side (local) clipping and Gaussian noise, for when the aggregator is not trusted.

With a `[privacy]` table in the device config (edge_runtime/config.py: clip_norm C and
local_noise_multiplier s), the device sends

    d' = clip(d, C) + z,    clip(d, C) = d * min(1, C / ||d||_2),    z ~ N(0, (s * C)^2 I)

instead of its raw delta d. Numpy only (devices have no dp-accounting). What it buys is in
docs/security-robust-dp.md: any clipped delta lies in a ball of diameter 2C, so one released
update is a Gaussian mechanism of L2 sensitivity 2C, i.e. noise multiplier s / 2 per round,
against anyone who sees the update (the broker, the aggregator). The noise is drawn once per
round; a re-send after a lost ack sends the same stored bytes, so it is never re-drawn.
"""

from __future__ import annotations

import numpy as np


def clip_and_noise(
    delta: np.ndarray, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """(clip(d, C) + N(0, (s C)^2 I) as float32, whether d was scaled down)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not noise_multiplier >= 0:
        raise ValueError(f"local_noise_multiplier must be >= 0, got {noise_multiplier}")
    d = np.asarray(delta, dtype=np.float64)
    norm = float(np.sqrt(np.dot(d, d)))
    clipped = norm > clip_norm
    if clipped:
        d = d * (clip_norm / norm)
    if noise_multiplier > 0:
        d = d + rng.normal(0.0, noise_multiplier * clip_norm, d.size)
    return d.astype(np.float32), clipped


def privatize_delta(delta: np.ndarray, privacy, rng: np.random.Generator | None = None) -> np.ndarray:
    """Apply a PrivacyConfig (clip_norm None: the delta unchanged). `rng` defaults to a
    generator seeded from the OS's entropy, so the noise is not predictable from the config."""
    if privacy.clip_norm is None:
        return delta
    out, _ = clip_and_noise(
        delta, float(privacy.clip_norm), float(privacy.local_noise_multiplier), rng or np.random.default_rng()
    )
    return out
