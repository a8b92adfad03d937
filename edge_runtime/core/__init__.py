"""The torch-free core every side shares: wire protocol, MQTT link, errors, files, names, manifests."""
