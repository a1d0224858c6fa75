"""The worker: the Faust app, batch intake and delivery, per-batch processing, the process supervisor."""
