"""Write a secured mosquitto (2.0+) configuration for one fleet.

    fleetlearn broker-config --fleet F --devices dev-0,dev-1 --out DIR [--tls]
        (--bundle BUNDLE | --max-model-params N) [--host broker.example.com] [--port P]

DIR afterwards holds:

    mosquitto.conf                 limits, persistence, one listener; every path in it absolute
    passwd                         PBKDF2-SHA512 ($7$) hashes: every device, the aggregator, [monitor]
    acl                            one `user` block per client: each may touch only its own topics
    ca.crt, server.crt, server.key with --tls: a CA made for this fleet and the broker's certificate
    ca.key                         with --tls: the CA's private key; stays with the operator
    devices/<id>/mqtt-password     each device's password (what `fleetlearn flash --credentials` reads)
    aggregator/mqtt-password       the aggregator's password (`fleetlearn aggregator --password-file`)
    monitor/mqtt-password          with --monitor: a read-only user for `fleetlearn monitor`
    devices/<id>/signing.key|.pub  with --signing-keys: each device's Ed25519 key pair (docs/security-signing.md)
    aggregator/signing.key|.pub    with --signing-keys: the aggregator's key pair (signs global models)
    aggregator/device-keys/<id>.pub  with --signing-keys: every device's public key (`aggregator --device-keys`)
    data/                          the broker's persistence directory
    systemd/fleetlearn-mosquitto-<fleet>.service, systemd/fleetlearn-aggregator-<fleet>.service
                                   hardened units for the broker and the aggregator (provisioning/systemd_units.py)
    README.md                      which file goes where

The password file is written in pure Python (the `$7$` format mosquitto 2.0's own
mosquitto_passwd writes), so an operator without mosquitto installed can run this; the file
stays editable with `mosquitto_passwd`. Why each limit and ACL line exists is in
docs/security-broker.md and in comments inside the files written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetlearn.edge_runtime.core.protocol import DEFAULT_CHUNK_SIZE
from fleetlearn.provisioning.spec import MONITOR_USER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the file list in the docstring readable
    parser.add_argument("--fleet", required=True, help="fleet name (the topics' fleetlearn/<fleet>/...)")
    parser.add_argument("--devices", required=True, help="comma-separated device ids, e.g. dev-0,dev-1")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (must not exist unless --force)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--bundle", type=Path, help="exported bundle: size the limits from its manifest and files")
    size.add_argument("--max-model-params", type=int, help="size the limits for a model of up to N parameters")
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"the aggregator's --chunk-size (default {DEFAULT_CHUNK_SIZE})"
    )
    parser.add_argument("--tls", action="store_true", help="TLS listener with a CA made for this fleet")
    parser.add_argument(
        "--host",
        default="localhost",
        help="name(s) clients use for the broker, comma-separated, in the server certificate (default localhost; 127.0.0.1 is always added)",
    )
    parser.add_argument("--port", type=int, help="listener port (default 8883 with --tls, else 1883)")
    parser.add_argument("--bind", help="listen on this address only (default: every interface)")
    parser.add_argument("--aggregator-user", default="aggregator", help="the aggregator's MQTT user name (default aggregator)")
    parser.add_argument("--monitor", action="store_true", help=f"also a read-only user {MONITOR_USER!r} for `fleetlearn monitor`")
    parser.add_argument(
        "--broker-dir",
        type=Path,
        help="where the broker host keeps these files, for the paths in mosquitto.conf (default: --out)",
    )
    parser.add_argument(
        "--run-as",
        help="mosquitto's `user` option: the account it drops to when started as root (default: mosquitto's own, `mosquitto`)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out (every password and, with --tls, the CA change)"
    )
    parser.add_argument(
        "--service-port",
        type=int,
        help="listener for the aggregator and the monitor, whose client ids are their own (default --port + 1)",
    )
    parser.add_argument(
        "--service-bind",
        default="127.0.0.1",
        help="address of the service listener (default 127.0.0.1: the aggregator runs on the broker host)",
    )
    parser.add_argument(
        "--fleetlearn-command",
        help="what systemd/fleetlearn-aggregator-FLEET.service runs (default: this Python with -m fleetlearn.cli)",
    )
    parser.add_argument(
        "--signing-keys",
        action="store_true",
        help="also make Ed25519 update-signing key pairs for every device and the aggregator (docs/security-signing.md)",
    )


def run(args: argparse.Namespace) -> int:
    from fleetlearn.edge_runtime.core.bundle import check_chunk_size
    from fleetlearn.provisioning.install import build
    from fleetlearn.provisioning.limits import compute_limits, size_from_bundle, size_from_params
    from fleetlearn.provisioning.spec import spec_from_args

    spec = spec_from_args(args)
    check_chunk_size(args.chunk_size)
    size = (
        size_from_bundle(args.bundle, args.chunk_size)
        if args.bundle is not None
        else size_from_params(args.max_model_params, args.chunk_size)
    )
    limits = compute_limits(size, len(spec.devices))
    build(spec, limits, size)
    print(
        f"wrote {spec.out}: {len(spec.devices)} devices, user {spec.aggregator_user}"
        + (f", user {MONITOR_USER}" if spec.monitor else "")
        + (", TLS" if spec.tls else ", plain TCP")
        + f", port {spec.port} (service port {spec.service_listener_port} on {spec.service_bind})"
        + f", message_size_limit {limits.message_size_limit}"
    )
    if spec.tls:
        print(f"keep {spec.layout.ca_key} with the operator: never copy it to a broker or a device")
    return 0
