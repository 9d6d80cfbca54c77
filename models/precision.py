"""Float32 islands inside mixed precision.

The training loop may run the forward pass under autocast (bf16 or fp16). Some arithmetic
must stay in float32 whatever the loop does: codebook distances and the EMA update (a code
assignment flips on a rounding error), likelihoods and KL terms (sums of many small log
terms). ``fp32`` marks such a function: its floating-point tensor arguments are cast to
float32 (float64 stays float64) and autocast is off inside it.
"""
from __future__ import annotations

import functools

import torch


def _up(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(torch.promote_types(value.dtype, torch.float32))
    return value


def fp32(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})

    return wrapper
