"""The aggregator's configuration: one dataclass per concern, nested in AggregatorConfig.

    AggregatorConfig(
        broker="mqtt://127.0.0.1:1883",           # or a LinkOptions (the MQTT link's own options)
        state_dir=Path("runs/a"), bundle=Path("bundles/boston"),
        rounds=RoundPolicy(rounds=5, min_devices=2, target_devices=3, deadline=30),
        training=TrainingPlan(local_epochs=1, lr=1e-3, lr_schedule="cosine"),   # schedule.py
        strategy=StrategyChoice("median", {"clip_norm": 1.0}),                  # registry.py
        sampling=SamplingOptions(sample_size=10),                               # sampling.py
        signing=SigningConfig(device_keys=Path("keys")),
    )

`validate()` raises a one-line UsageError for anything a user got wrong; the CLI
(aggregator/cli.py) builds the same object from flags. The engine is given an exported bundle
directory: exporting a model on start (`--model`) is the CLI's job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from fleetlearn.aggregator.distribution import DEFAULT_CHUNK_SIZE, check_chunk_size
from fleetlearn.aggregator.leader import LeasePolicy
from fleetlearn.aggregator.registry import StrategyChoice
from fleetlearn.aggregator.sampling import SamplingOptions
from fleetlearn.aggregator.schedule import TrainingPlan
from fleetlearn.aggregator.wire import WirePolicy
from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.mqtt import BrokerURL, LinkOptions
from fleetlearn.edge_runtime.core.protocol import Topics


@dataclass(frozen=True)
class RoundPolicy:
    """How many rounds, and when each one closes (docs/aggregator.md, round state machine)."""

    rounds: int
    min_devices: int  # accepted updates a round needs to close at its deadline
    target_devices: int | None = None  # close as soon as this many are accepted (default: min_devices)
    deadline: float = 60.0  # seconds a round stays open (and each extension adds)
    max_extensions: int = 3
    round_interval: float = 0.0  # open rounds no more often than this (seconds), to watch a demo

    @property
    def target(self) -> int:
        return self.target_devices if self.target_devices is not None else self.min_devices

    def validate(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"--rounds must be >= 1, got {self.rounds}")
        if self.min_devices < 1:
            raise UsageError(f"--min-devices must be >= 1, got {self.min_devices}")
        if self.target < self.min_devices:
            raise UsageError(f"--target-devices {self.target} is below --min-devices {self.min_devices}")
        if not self.deadline > 0:
            raise UsageError(f"--deadline must be > 0 seconds, got {self.deadline}")
        if self.max_extensions < 0:
            raise UsageError(f"--max-extensions must be >= 0, got {self.max_extensions}")
        if not 0 <= self.round_interval <= 3600:
            raise UsageError(f"--round-interval must be in [0, 3600] seconds, got {self.round_interval}")


@dataclass(frozen=True)
class SigningConfig:
    """Update signing (aggregator/signing.py, docs/security-signing.md)."""

    signing_key: Path | None = None  # the aggregator's Ed25519 key; default STATE_DIR/aggregator-signing.key
    device_keys: Path | None = None  # import DIR/<device_id>.pub into STATE_DIR/device-keys on start
    require_signatures: bool | None = None  # None: required when device keys are registered


def default_client_id(fleet: str) -> str:
    """The default's prefix: the engine appends the run id's first 8 hex digits once the state dir
    is open (aggregator_client_id), so aggregators of two runs never share a client id."""
    return f"fleetlearn-aggregator-{fleet}"


def aggregator_client_id(link: LinkOptions, fleet: str, run_id: str) -> LinkOptions:
    """`link` with the default client id made specific to the run (an explicit --client-id is kept)."""
    if link.client_id != default_client_id(fleet):
        return link
    return dataclasses.replace(link, client_id=f"{link.client_id}-{run_id[:8]}")


def link_options(url: str, fleet: str, **kw) -> LinkOptions:
    """The aggregator's link: a persistent session, so the broker queues updates while it restarts."""
    return LinkOptions(url=url, client_id=kw.pop("client_id", None) or default_client_id(fleet), clean_session=False, **kw)


@dataclass
class AggregatorConfig:
    """Everything `fleetlearn aggregator` takes; the demo and the Python API build one directly."""

    broker: LinkOptions | str  # a URL is turned into the default LinkOptions for the fleet
    state_dir: Path
    bundle: Path  # an exported bundle dir
    rounds: RoundPolicy
    training: TrainingPlan = field(default_factory=TrainingPlan)
    strategy: StrategyChoice = field(default_factory=StrategyChoice)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)  # client sampling (aggregator/sampling.py)
    signing: SigningConfig = field(default_factory=SigningConfig)
    lease: LeasePolicy = field(default_factory=LeasePolicy)  # the fleet's leader lease (aggregator/leader.py)
    fleet: str = "default"
    test_data: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    wire: WirePolicy = field(default_factory=WirePolicy)  # --compression, --max-message-size (wire.py)
    connect_timeout: float = 30.0  # give up (exit 2) when the broker is unreachable at start

    def __post_init__(self) -> None:
        if isinstance(self.broker, str):
            self.broker = link_options(self.broker, self.fleet)

    @property
    def round_target(self) -> int:
        """Accepted updates that close a round: --sample-size with sampling, else --target-devices
        (with --sample-fraction it varies per round; this is its floor, --min-devices)."""
        return self.sampling.sample_size if self.sampling.sample_size is not None else self.rounds.target

    @property
    def link(self) -> LinkOptions:
        assert isinstance(self.broker, LinkOptions)
        return self.broker

    def validate(self) -> None:
        """Raise UsageError (one line) for anything a user got wrong."""
        self.rounds.validate()
        self.training.validate(self.rounds.rounds)
        check_chunk_size(self.chunk_size)
        self.wire.validate()
        self.sampling.validate(self.rounds.min_devices, self.rounds.target_devices)
        if self.sampling.sample_fraction is not None and self.strategy.options.get("noise_multiplier") is not None:
            raise UsageError(
                "--dp-noise-multiplier needs a fixed round target for its noise denominator: use --sample-size K, not --sample-fraction"
            )
        self.lease.validate()
        self.strategy.validate(self.round_target, self.training.proximal_mu)
        try:
            Topics(self.fleet)
        except Exception as exc:
            raise UsageError(f"--fleet: {exc}") from None
        if self.link.password is not None and self.link.username is None:
            raise UsageError("a password needs --username")
        if self.link.protocol not in ("3.1.1", "5"):
            raise UsageError(f"--mqtt-protocol must be 3.1.1 or 5, got {self.link.protocol!r}")
        BrokerURL.parse(self.link.url)  # ConfigError (a UsageError) with the reason
        if not self.connect_timeout > 0:
            raise UsageError(f"--connect-timeout must be > 0 seconds, got {self.connect_timeout}")
