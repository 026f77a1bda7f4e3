"""cortex-gateway: the HTTP front door (OpenAI chat, completions and responses; Anthropic messages), relaying over NATS.

Never imports torch or transformers: a gateway is cheap to run and to replicate.
"""
