"""What the linear probe and fine-tuning share: labels, scoring and the pre-trained encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax import data
from mim_jax.config import defaults
from mim_jax.config import validation as v
from mim_jax.methods import base
from mim_jax.models.vit import encoder_from_config
from mim_jax.weights import pretrained


def num_classes(config) -> int:
  """config.classifier.num_classes, or the dataset's class count when it is 0 (or when the
  config has no classifier: the k-NN monitor of a pre-training run)."""
  if "classifier" in config and config.classifier.num_classes:
    return int(config.classifier.num_classes)
  return data.num_classes(config.data)


def check_num_classes(config) -> None:
  """An evaluation's classifier.num_classes, when set, against its dataset's class count
  (data.num_classes: the class folders, labels or TFDS info of the training source, listed
  here). Fashion-MNIST and synthetic data are checked by validation already; the loop's runs
  (training.setup.setup_run) and the frozen-feature jobs call this before anything costly."""
  if "classifier" in config and config.classifier.num_classes:
    v.check_num_classes(config, data.num_classes(config.data))


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


def add_classifier_config(c: ml_collections.ConfigDict, **classifier_fields) -> None:
  """The fields every evaluation has: init_from, `config.classifier` with `classifier_fields`
  (None: the default value) and `config.eval` (its batch and, for methods trained by the
  loop, how often the evaluation split is scored)."""
  defaults.init_from_field(c)
  c.classifier = defaults.classifier_block(num_classes=None, **classifier_fields)
  c.eval = ml_collections.ConfigDict(dict(batch_size=256))


def add_scored_config(c: ml_collections.ConfigDict) -> None:
  """`eval.every_epochs`: evaluation-split scoring during training (0: only at the end)."""
  c.eval.every_epochs = 0.0


def validate_scored(config) -> None:
  v.validate_classifier(config)
  e = config.eval.every_epochs
  v.require(v.is_number(e) and e >= 0, "eval.every_epochs", e,
            "a number >= 0 (0: only at the end)")


class FrozenEncoderClassifier(base.Method):
  """What the probes that train a head on a frozen encoder share (the linear probe, the
  attentive probe): the encoder lives in `extra["encoder"]`, outside the optimizer, loaded
  from init_from and run forward only (`self.encoder`, sized by the config as init_from's
  export sets it; `self.layer`, the block read); a subclass defines `logits(params, extra,
  images)`."""

  kind = "classifier"
  evaluates = True

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                       posemb=pretrained.encoder_posemb(config.init_from))
    self.layer = int(config.classifier.probe_layer)

  def wants_weights(self) -> bool:
    return pretrained.is_pretrained(self.config.init_from)

  @classmethod
  def unread_rules(cls):
    # The frozen encoder runs forward only, in inference mode, with no gradient to keep.
    return [(("model.drop_path_rate", "model.remat"), lambda c: False,
             "the probe's encoder is frozen (forward only, no stochastic depth, nothing to "
             "recompute)")]

  def load_pretrained(self, params, extra):
    extra = dict(extra, encoder=pretrained.load_encoder_into(
        extra["encoder"], self.config.init_from, grid_hw=self.encoder.grid_hw))
    return params, extra

  def eval_metrics(self, params, extra, batch):
    return classification_sums(self.logits(params, extra, batch["image"]), batch["label"],
                               batch["mask"])

  def encoder_params(self, params, extra):
    return extra["encoder"]
