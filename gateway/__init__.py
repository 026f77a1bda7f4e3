"""cortex-gateway: the HTTP front door (OpenAI dialect today), relaying over NATS.

Never imports torch or transformers: a gateway is cheap to run and to replicate.
"""
