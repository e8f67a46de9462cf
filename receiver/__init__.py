"""The HTTP edge: PacSpace webhooks in, verified and recorded through `reconciler` and `storage`."""
