"""One round of local training on a device: can this bundle do what the round asks, and the run.

The round's config (`GlobalModel.config`) overrides the device's own [training] settings. FedProx
(Li et al. 2020): with `proximal_mu` > 0 the device minimises loss + mu/2 ||w - w_global||^2,
which needs the term in the bundle's training graphs (manifest `proximal`). A bundle exported
without it cannot honour the round: the device says so and sits the round out (`sit_out_reason`)
rather than train a different objective than the one the aggregator asked for.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.data import Dataset
from fleetlearn.edge_runtime.core.protocol import GlobalModel
from fleetlearn.edge_runtime.device.config import TrainingConfig
from fleetlearn.edge_runtime.engines.base import Engine, TrainResult


def sit_out_reason(manifest: Manifest, g: GlobalModel) -> str | None:
    """Why this device cannot train round `g` as asked, or None when it can."""
    mu = g.config.proximal_mu
    if mu and not manifest.proximal:
        return (
            f"round {g.round} asks for FedProx (proximal_mu {mu:g}) but bundle {manifest.model_hash[:12]} has no proximal term; "
            "re-export it with a current fleetlearn (without --no-proximal)"
        )
    return None


def train_round(
    trainer: Engine, data: Dataset, t: TrainingConfig, g: GlobalModel, device_id: str, service: Callable[[], None] | None = None
) -> tuple[TrainResult, np.ndarray]:
    """Load the global weights, train with the round's settings; (result, delta = local - global).
    `service`, called between steps, keeps the device's connection served (device/host.py)."""
    c = g.config
    trainer.set_weights(g.weights)
    result = trainer.train(
        data,
        batch_size=c.batch_size or t.batch_size,
        epochs=c.local_epochs or t.local_epochs,
        max_steps=c.max_steps or t.max_steps,
        seed=[t.seed, g.round, zlib.crc32(device_id.encode())],
        lr=c.lr,
        mu=c.proximal_mu or 0.0,  # anchored at the weights just loaded: w_global
        service=service,
    )
    return result, trainer.get_weights() - g.weights
