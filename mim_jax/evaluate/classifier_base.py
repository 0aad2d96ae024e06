"""What the linear probe and fine-tuning share: labels, scoring and the pre-trained encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mim_jax import data


def num_classes(config) -> int:
  """config.classifier.num_classes, or the dataset's class count when it is 0."""
  return int(config.classifier.num_classes) or data.num_classes(config.data)


def classification_sums(logits: jax.Array, labels: jax.Array,
                        valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over valid rows: correct top-1 predictions, cross-entropy and count.

  logits [B, C] float32, labels int [B], valid bool [B] (False for padding rows).
  """
  valid = valid.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {"correct": jnp.sum(correct * valid), "loss": jnp.sum(ce * valid),
          "count": jnp.sum(valid)}


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy of logits [B, C] against integer labels [B]."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
