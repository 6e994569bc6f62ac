"""Bulwark's torch core: models, data, losses, attacks, training and the audit protocol.

This package's ``__init__`` and its ``config`` and ``progress`` modules import no torch, so the
API can validate job specs with the very models the core runs on.
"""
