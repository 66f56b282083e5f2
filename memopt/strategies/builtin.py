"""Imports every built-in strategy module so that each registers itself."""

from memopt.strategies import (  # noqa: F401
    accum, amp, chunked_ce, ckpt, offload, optim8bit, optim_in_bwd, prune, quant, sdpa)
