"""Provisioning a fleet: the operator's tools that make a broker's config and every credential.

    broker_config   `fleetlearn broker-config`: the subcommand (arguments, run)
    spec            what to provision, checked (fleet, devices, users, listener)
    layout          the credentials directory's file names: the one place that knows them
    limits          broker limits sized from the model and the fleet (protocol bounds imported)
    passwords       MQTT users and mosquitto's `$7$` password file
    acl             mosquitto's ACL, derived from the protocol's topic tree
    mosquitto_conf  mosquitto.conf
    pki             the fleet's CA and broker certificate; Ed25519 key pairs for signing
    readme          README.md of a credentials directory
    install         writing the tree with exact modes and renaming it into place
    credentials     one device's secrets picked out of the directory (`flash --credentials`)

Layer: imports the standard library, fleetlearn.edge_runtime and `cryptography` (lazily) only;
never the aggregator, export or the CLI layer (tests/test_layers.py).
"""
