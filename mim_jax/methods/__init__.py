"""Pre-training methods, one module each behind `methods.base.Method`.

The registry (mim_jax/registry.py) names them together with the trained evaluations
(mim_jax/evaluate) and the tokenizers (mim_jax/tokenizers); nothing here imports those.
"""
