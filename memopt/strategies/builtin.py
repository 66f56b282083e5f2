"""Imports every built-in strategy module so that each registers itself."""

from memopt.strategies import accum, amp, chunked_ce, ckpt, offload, optim_in_bwd, sdpa  # noqa: F401
