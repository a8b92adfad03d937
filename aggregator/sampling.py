"""Client sampling with over-selection (Bonawitz et al. 2019, "Towards Federated Learning at
Scale", section 2.2 / 4): which connected devices are invited to a round, and its target.

    --sample-size K        the round's target is K accepted updates
    --sample-fraction F    the round's target is max(--min-devices, ceil(F x connected devices))
    --over-selection X     invite min(connected, ceil(X x target)) devices (default 1.3), close at
                           the target; the invited devices still training then are told the round
                           closed (their late updates are refused "round r closed", as today)
    --sample-seed S        the invitations' seed (default: the run id)

"Connected" = the devices whose retained status is anything but `offline` (aggregator/presence.py).
The cohort is a uniform sample without replacement of `invited` devices among the `connected`
ones: each device's rank is sha256(salt || device id) with salt = sha256("fleetlearn-invite:" seed
":" round)[:16 bytes], and the `invited` lowest ranks are taken. The wire carries only (salt,
below) (edge_runtime/core/protocol/messages.py, Invitation), so a device checks its own
invitation and the message size does not grow with the fleet. The same seed, round and connected
set give the same cohort; the cohort is persisted with the open round (partial_round.bin, from
its first accepted update on), so an aggregator restarted mid-round keeps the invitations it
made; restarted before that, it draws again (the same cohort unless the fleet changed).

DP accounting (aggregator/dp_fedavg.py): round r's sampling rate is q_r = invited_r /
connected_r, the probability that a connected device was asked to contribute that round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetlearn.aggregator.options import Options, option
from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import Invitation, invitation_rank

DEFAULT_OVER_SELECTION = 1.3


@dataclass(frozen=True)
class SamplingOptions(Options):
    sample_size: int | None = option(
        None,
        "--sample-size",
        int,
        "invite a sample of the connected devices each round and close at K accepted updates",
        metavar="K",
        check=lambda k: 1 <= k <= 1_000_000,
        bound="in [1, 1000000]",
    )
    sample_fraction: float | None = option(
        None,
        "--sample-fraction",
        float,
        "as --sample-size with K = max(--min-devices, ceil(F x connected devices))",
        metavar="F",
        check=lambda f: 0 < f <= 1,
        bound="in (0, 1]",
    )
    over_selection: float | None = option(
        None,
        "--over-selection",
        float,
        f"invite ceil(X x the round's target) devices (default {DEFAULT_OVER_SELECTION})",
        metavar="X",
        check=lambda x: 1 <= x <= 10,
        bound="in [1, 10]",
    )
    sample_seed: int | None = option(
        None,
        "--sample-seed",
        int,
        "seed of the invitations (default: the run id)",
        metavar="S",
        check=lambda s: 0 <= s < 2**63,
        bound="in [0, 2^63)",
    )

    @property
    def enabled(self) -> bool:
        return self.sample_size is not None or self.sample_fraction is not None

    @property
    def factor(self) -> float:
        return DEFAULT_OVER_SELECTION if self.over_selection is None else float(self.over_selection)

    def to_log(self) -> str:
        size = f"size={self.sample_size}" if self.sample_size is not None else f"fraction={self.sample_fraction}"
        return f"{size},over_selection={self.factor}"

    def validate(self, min_devices: int, target_devices: int | None) -> None:
        """UsageError (one line) for combinations that cannot work."""
        if self.sample_size is not None and self.sample_fraction is not None:
            raise UsageError("give one of --sample-size K or --sample-fraction F, not both")
        if not self.enabled:
            stray = [
                f for f, v in (("--over-selection", self.over_selection), ("--sample-seed", self.sample_seed)) if v is not None
            ]
            if stray:
                raise UsageError(f"{', '.join(stray)} applies with --sample-size or --sample-fraction only")
            return
        if target_devices is not None:
            raise UsageError(
                "--target-devices does not apply with --sample-size/--sample-fraction: the sample sets each round's target"
            )
        if self.sample_size is not None and self.sample_size < min_devices:
            raise UsageError(
                f"--sample-size {self.sample_size} is below --min-devices {min_devices}: a round would close before it has its minimum"
            )

    def need(self, min_devices: int) -> int:
        """Connected devices a round needs before it can draw its cohort."""
        return self.sample_size if self.sample_size is not None else min_devices

    def target(self, connected: int, min_devices: int) -> int:
        if self.sample_size is not None:
            return self.sample_size
        assert self.sample_fraction is not None
        return max(min_devices, _ceil(self.sample_fraction * connected))

    def wanted(self, target: int) -> int:
        """ceil(X x target): the devices a round with this target invites when enough are connected."""
        return _ceil(self.factor * target)

    def invite_count(self, target: int, connected: int) -> int:
        return min(connected, self.wanted(target))


def _ceil(x: float) -> int:
    """ceil, forgiving float noise: 1.3 * 10 = 13.000000000000002 -> 13."""
    return math.ceil(round(x, 9))


def round_salt(seed: str | int, rnd: int) -> str:
    """The round's 128-bit salt (32 hex) from the run's seed and the round number."""
    return hashlib.sha256(f"fleetlearn-invite:{seed}:{rnd}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Cohort:
    """One round's sample: who was invited among how many connected devices, and its target."""

    invitation: Invitation
    invited: tuple[str, ...]  # sorted
    connected: int
    target: int

    @property
    def sampling_rate(self) -> float:
        """q = invited / connected: the chance a connected device was asked this round."""
        return len(self.invited) / self.connected if self.connected else 0.0

    def to_doc(self) -> dict[str, Any]:
        return {
            "salt": self.invitation.salt,
            "below": self.invitation.below,
            "invited": list(self.invited),
            "connected": self.connected,
            "target": self.target,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Cohort:
        return cls(
            Invitation.from_meta({"salt": doc["salt"], "below": doc["below"]}),
            tuple(str(d) for d in doc["invited"]),
            int(doc["connected"]),
            int(doc["target"]),
        )


def draw_cohort(connected: Sequence[str], rnd: int, seed: str | int, options: SamplingOptions, min_devices: int) -> Cohort:
    """The cohort of round `rnd` among the `connected` device ids (deterministic in its inputs)."""
    devices = sorted(set(connected))
    n = len(devices)
    target = options.target(n, min_devices)
    k = options.invite_count(target, n)
    salt = round_salt(seed, rnd)
    ranked = sorted(devices, key=lambda d: (invitation_rank(salt, d), d))
    invited = ranked[:k]
    below = invitation_rank(salt, invited[-1]) + 1 if invited else 0
    # A device not seen at the draw but ranked below `below` is invited too when it shows up;
    # the aggregator accepts it (same rule) and it is counted in `devices`, not in `invited`.
    return Cohort(Invitation(salt, below), tuple(sorted(invited)), n, target)
