"""mim_jax: masked image modeling (MAE, SimMIM, BEiT, data2vec, iBOT) in JAX/Flax."""

__version__ = "0.1.0"
