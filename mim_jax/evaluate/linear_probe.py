"""Linear probing (MAE protocol): a BatchNorm(affine=False) + linear head on frozen features.

The encoder is frozen: its weights live in `extra`, outside the optimizer, and its features are
taken under stop_gradient from `classifier.probe_layer` (0 = encoder output) with
`classifier.pool` (cls token or mean of patch tokens). `classifier.features="pixels"` probes the
flattened normalised pixels instead (the raw-pixel baseline). Training images are augmented as
in pre-training (RandomResizedCrop + flip); the MAE recipe uses LARS, lr 0.1 x batch / 256, no
weight decay, 90 epochs with 10 of warmup (configs/linprobe_*.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mim_jax.evaluate import classifier_base
from mim_jax.models import flops
from mim_jax.models.heads import ProbeHead, encoder_features


class LinearProbe(classifier_base.FrozenEncoderClassifier):
  """The linear probe as the training loop sees it (see `methods.base.Method`).

  params = {"head": Dense}; extra = {"encoder": frozen encoder, "batch_stats": BatchNorm stats}.
  """

  name = "linprobe"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    classifier_base.add_classifier_config(c, pool=None, features=None, probe_layer=None,
                                          head_init_std=None)
    classifier_base.add_scored_config(c)

  @classmethod
  def validate(cls, config):
    classifier_base.validate_scored(config)

  @classmethod
  def forward_flops(cls, config):
    encoder = (0.0 if config.classifier.features == "pixels" else
               flops.encoder_flops(config.model, config.image_size, config.channels))
    return {"encoder": encoder, "teacher": encoder, "total": encoder}  # frozen: forward only

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.pixels = config.classifier.features == "pixels"
    self.pool = config.classifier.pool
    self.head = ProbeHead(num_classes=classifier_base.num_classes(config),
                          head_init_std=config.classifier.head_init_std)

  def wants_weights(self) -> bool:
    return super().wants_weights() and not self.pixels

  def with_axis(self, axis_name):
    clone = super().with_axis(axis_name)
    clone.head = self.head.clone(axis_name=axis_name)  # BatchNorm over every device's features
    return clone

  def features(self, encoder_params, images):
    """Frozen features [B, D] of images [B, H, W, C] (D = H*W*C for raw pixels)."""
    if self.pixels:
      return images.reshape(images.shape[0], -1).astype(jnp.float32)
    return jax.lax.stop_gradient(encoder_features(self.encoder, encoder_params, images,
                                                  pool=self.pool, layer=self.layer))

  def init(self, rng, images):
    enc_rng, head_rng = jax.random.split(rng)
    encoder = {} if self.pixels else self.encoder.init(enc_rng, images)["params"]
    variables = self.head.init(head_rng, self.features(encoder, images), train=False)
    return ({"head": variables["params"]},
            {"encoder": encoder, "batch_stats": variables["batch_stats"]})

  def loss(self, params, extra, batch, rng, train=True):
    del rng
    feats = self.features(extra["encoder"], batch["image"])
    logits, updates = self.head.apply(
        {"params": params["head"], "batch_stats": extra["batch_stats"]}, feats, train=train,
        mutable=["batch_stats"])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    metrics = {"loss": loss, "accuracy": classifier_base.accuracy(logits, batch["label"])}
    return loss, (metrics, dict(extra, batch_stats=updates["batch_stats"]))

  def logits(self, params, extra, images):
    """Evaluation logits [B, classes] with the running BatchNorm statistics."""
    return self.head.apply({"params": params["head"], "batch_stats": extra["batch_stats"]},
                           self.features(extra["encoder"], images), train=False)
