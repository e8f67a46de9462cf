"""The local ledger: what we emitted, what PacSpace told us, and every gap.

This package depends on nothing else in the project; `receiver` and
`reconciler` depend on it.
"""
