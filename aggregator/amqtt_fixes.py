"""amqtt 0.12.1's Broker with retained messages delivered as MQTT 3.1.1 says: once per SUBSCRIBE.

The defect (measured with real clients, pinned by tests/test_broker_retained.py): after every
CONNECT, amqtt 0.12.1's `Broker._handle_client_session` runs

    for topic in self._subscriptions:
        await self._publish_retained_messages_for_subscription((topic, QOS_0), client_session)

over the broker's *whole* subscription table, every client's filters, not the connecting
session's. So a client receives, unasked and before its own SUBSCRIBE, every retained message
that matches any filter anybody holds: a clean-session client subscribed to `a/global` also
gets `a/metrics` when the monitor subscribes to it, a later subscriber gets a retained message
twice (once unasked at CONNECT, once for its SUBSCRIBE), and a resumed persistent session gets
them all again. MQTT 3.1.1 sends retained messages when a subscription is made (3.3.1.3,
MQTT-3.8.4-3), and mosquitto does exactly that.

The fix, without copying amqtt's connection handler: `add_subscription` (called for every
filter of a SUBSCRIBE, before its retained messages are sent) records that this session just
subscribed to this filter; `_publish_retained_messages_for_subscription` sends only against
such a record and consumes it. The CONNECT loop finds no record and sends nothing.

It overrides two private methods, so it is tied to amqtt 0.12.1 (pinned in pyproject.toml);
`check_amqtt()` refuses another version instead of silently running an unfixed broker.
"""

from __future__ import annotations

from typing import Any

AMQTT_VERSION = "0.12.1"


def check_amqtt() -> None:
    from importlib.metadata import version

    found = version("amqtt")
    if found != AMQTT_VERSION:
        raise RuntimeError(
            f"the embedded broker's retained-message fix is written for amqtt {AMQTT_VERSION}, found {found}; reinstall fleetlearn's pinned dependencies"
        )


def fixed_broker_class() -> type:
    """amqtt's Broker subclass with retained messages sent on SUBSCRIBE only (imports amqtt)."""
    check_amqtt()
    from amqtt.broker import Broker

    for name in ("add_subscription", "_publish_retained_messages_for_subscription", "_delete_session", "_cleanup_session"):
        if not callable(getattr(Broker, name, None)):
            raise RuntimeError(f"amqtt.broker.Broker has no {name}(): the retained-message fix does not apply")

    class RetainedOnSubscribeBroker(Broker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # (client_id, filter) pairs subscribed and not yet answered with retained messages.
            self._fresh_subscriptions: set[tuple[str, str]] = set()

        async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
            code = await super().add_subscription(subscription, session)
            if code in (0, 1, 2):  # granted QoS; 0x80 is a refusal and gets nothing
                self._fresh_subscriptions.add((session.client_id, subscription[0]))
            return code

        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
            key = (session.client_id, subscription[0])
            if key not in self._fresh_subscriptions:
                return  # amqtt's CONNECT-time loop over everybody's filters: not for this client
            self._fresh_subscriptions.discard(key)
            await super()._publish_retained_messages_for_subscription(subscription, session)

        def _forget(self, client_id: str) -> None:
            self._fresh_subscriptions = {k for k in self._fresh_subscriptions if k[0] != client_id}

        async def _delete_session(self, client_id: str) -> None:
            self._forget(client_id)
            await super()._delete_session(client_id)

        async def _cleanup_session(self, client_id: str) -> None:
            self._forget(client_id)
            await super()._cleanup_session(client_id)

    return RetainedOnSubscribeBroker
