"""Device provisioning: hardware profiles and `fleetlearn flash`, which turns a profile, an
export bundle and one device's credentials into a self-contained image to copy to the device.

Operator-side code: a device never imports this package (it only runs what the image installs).
"""
