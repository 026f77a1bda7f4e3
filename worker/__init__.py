"""cortex-worker: loads models in-process and serves their request subjects.

The asyncio side (`cortex.worker.service`) talks to NATS; the engine thread
(`cortex.worker.engine`) owns the device and is the only code that runs torch.
"""
