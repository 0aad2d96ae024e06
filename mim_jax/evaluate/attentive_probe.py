"""Attentive probing: a learned query attends over a frozen encoder's tokens, then a linear
classifier (`models.heads.AttentivePoolingHead`: V-JEPA's attentive classifier, one block).

The encoder is frozen as in the linear probe (its weights in `extra`, outside the optimizer,
run forward only under stop_gradient): the tokens of `classifier.probe_layer` (0 = the encoder
output, k = block k), the [CLS] token among them, are read by one cross-attention block with
`attentive.num_heads` heads (0: the encoder's) and an MLP of `attentive.mlp_ratio` x its
width, trained by the loop with the config's optimizer on augmented images (RandomResizedCrop
+ flip). Where the linear probe reads one pooled vector, this head weighs the patches per
image: a fairer read-out of features that are not linearly separable once averaged (MIM's
often are not), at the price of a head with parameters of its own ((4 + 2 mlp_ratio) x
width^2 besides the classifier). Weight decay skips its biases and its query token.
`init_from=random` is the random-encoder baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax.config import validation as v
from mim_jax.evaluate import classifier_base
from mim_jax.models import flops
from mim_jax.models.heads import AttentivePoolingHead, attentive_head_flops
from mim_jax.models.vit import block_output, size_from_config


class AttentiveProbe(classifier_base.FrozenEncoderClassifier):
  """The attentive probe as the training loop sees it (see `methods.base.Method`).

  params = {"head": AttentivePoolingHead}; extra = {"encoder": the frozen encoder}.
  """

  name = "attentive_probe"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    classifier_base.add_classifier_config(c, probe_layer=None, head_init_std=None)
    classifier_base.add_scored_config(c)
    # num_heads 0: as many heads as the encoder has.
    c.attentive = ml_collections.ConfigDict(dict(num_heads=0, mlp_ratio=4.0))

  @classmethod
  def validate(cls, config):
    classifier_base.validate_scored(config)
    v.require(isinstance(config.init_from, str) and config.init_from != "", "init_from",
              config.init_from, "a pre-training or fine-tuning workdir or an encoder directory "
              "(the attentive probe reads a trained encoder's tokens), or 'random' for a "
              "random-encoder baseline")
    a, width = config.attentive, size_from_config(config.model)[0].width
    v.require(v.is_int(a.num_heads) and a.num_heads >= 0 and width % max(a.num_heads, 1) == 0,
              "attentive.num_heads", a.num_heads,
              f"0 (the encoder's heads) or a divisor of the encoder width {width}")
    v.require(v.is_number(a.mlp_ratio) and a.mlp_ratio * width >= 1, "attentive.mlp_ratio",
              a.mlp_ratio, f"a positive number (the MLP's width over the encoder's {width}), "
              "at least one unit wide")

  @classmethod
  def forward_flops(cls, config):
    size, patch = size_from_config(config.model)
    tokens = 1 + (config.image_size[0] // patch) * (config.image_size[1] // patch)
    encoder = flops.encoder_flops(config.model, config.image_size, config.channels)
    head = attentive_head_flops(tokens, size.width, int(config.attentive.mlp_ratio * size.width),
                                classifier_base.num_classes(config))
    # The frozen encoder runs forward only ("teacher"); the head trains.
    return {"encoder": encoder, "teacher": encoder, "head": head, "total": encoder + head}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    heads = int(config.attentive.num_heads) or self.encoder.num_heads
    self.head = AttentivePoolingHead(num_classes=classifier_base.num_classes(config),
                                     num_heads=heads,
                                     mlp_ratio=float(config.attentive.mlp_ratio),
                                     head_init_std=config.classifier.head_init_std)

  def tokens(self, encoder_params, images):
    """Frozen tokens [B, 1 + N, D] (float32) of block `probe_layer` of images [B, H, W, C]
    (the encoder lives in `extra`, which the optimizer never sees)."""
    out, aux = self.encoder.apply({"params": encoder_params}, images, train=False)
    return block_output(out, aux, self.layer).astype(jnp.float32)

  def init(self, rng, images):
    enc_rng, head_rng = jax.random.split(rng)
    encoder = self.encoder.init(enc_rng, images)["params"]
    head = self.head.init(head_rng, self.tokens(encoder, images))["params"]
    return {"head": head}, {"encoder": encoder}

  def logits(self, params, extra, images):
    """Logits [B, classes] of images [B, H, W, C]."""
    return self.head.apply({"params": params["head"]}, self.tokens(extra["encoder"], images))

  def loss(self, params, extra, batch, rng, train=True):
    del rng, train  # no dropout in the head; the encoder is frozen
    logits = self.logits(params, extra, batch["image"])
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    metrics = {"loss": loss, "accuracy": classifier_base.accuracy(logits, batch["label"])}
    return loss, (metrics, extra)
