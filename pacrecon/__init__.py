"""The composition root and command line: the one place that knows receiver, reconciler and storage."""
