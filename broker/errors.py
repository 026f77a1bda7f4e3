"""Errors the broker layer raises; nats-py exceptions never leave `cortex.broker`.

::

    BrokerError
    ├── BrokerUnavailable   the server cannot be reached or JetStream is off
    │   └── CredentialsError  a credentials or TLS file is missing, unreadable or malformed
    ├── QueueFull           the model's request queue is at its limit
    ├── PayloadTooLarge     a message is bigger than the server accepts
    └── NotProvisioned      a stream, consumer or bucket is missing
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base class of every error raised by `cortex.broker`."""


class BrokerUnavailable(BrokerError):
    pass


class CredentialsError(BrokerUnavailable):
    """The process cannot start: retrying does not mend a file."""


class QueueFull(BrokerError):
    pass


class PayloadTooLarge(BrokerError):
    pass


class NotProvisioned(BrokerError):
    pass
