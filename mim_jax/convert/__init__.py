"""Weight converters between mim_jax params and other implementations' checkpoints.

Importing this package never imports torch: converters take plain dicts of numpy arrays (or
torch tensors, read through their own methods).
"""

from __future__ import annotations

from mim_jax.convert.hf_vitmae import (
    expected_hf_shapes,
    hf_vitmae_state_dict_from_params,
    params_from_hf_vitmae,
)

__all__ = ["expected_hf_shapes", "hf_vitmae_state_dict_from_params", "params_from_hf_vitmae"]
