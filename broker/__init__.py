"""Everything that talks to NATS: connection, provisioning, the embedded server, cortexctl.

Only this package imports ``nats``. The gateway and the worker use the narrow
verbs of `cortex.broker.bus.Bus` and see only the errors of
`cortex.broker.errors`.
"""
