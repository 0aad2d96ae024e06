"""End-to-end fine-tuning of a pre-trained encoder with a classification head.

The MAE / BEiT recipe: learned position embeddings initialised from the pre-trained (sin-cos)
ones and resized when the patch grid changes, drop path, Mixup / CutMix with label smoothing
(on device, inside the jitted step), AdamW with layer-wise lr decay and masked weight decay,
warmup + cosine (configs/finetune_*.py). With `init_from` empty the same recipe trains the ViT
from scratch (the supervised baseline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mim_jax import mixup
from mim_jax.evaluate import classifier_base, pretrained
from mim_jax.models.heads import ViTClassifier
from mim_jax.models.vit import encoder_from_config


class FineTune:
  """Fine-tuning as the training loop sees it: params = {"encoder", "head"[, "fc_norm"]}."""

  name = "finetune"

  def __init__(self, config):
    self.config = config
    encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                  posemb="learn")
    self.num_classes = classifier_base.num_classes(config)
    self.model = ViTClassifier(encoder=encoder, num_classes=self.num_classes,
                               pool=config.classifier.pool,
                               head_init_std=config.classifier.head_init_std)
    c = config.classifier
    self.mix = dict(mixup_alpha=float(c.mixup_alpha), cutmix_alpha=float(c.cutmix_alpha),
                    prob=float(c.mixup_prob), switch_prob=float(c.mixup_switch_prob),
                    label_smoothing=float(c.label_smoothing))

  def init(self, rng, images):
    return self.model.init(rng, images)["params"], {}

  def load_pretrained(self, params, extra):
    if pretrained.is_pretrained(self.config.init_from):
      params = dict(params, encoder=pretrained.load_encoder_into(
          params["encoder"], self.config.init_from, grid_hw=self.model.encoder.grid_hw))
      params = pretrained.load_classifier_head_into(params, self.config.init_from)
    return params, extra

  def loss(self, params, extra, batch, rng, train=True):
    mix_rng, drop_rng = jax.random.split(rng)
    images, labels = batch["image"], batch["label"]
    if train:
      images, targets = mixup.mix_batch(mix_rng, images, labels, num_classes=self.num_classes,
                                        **self.mix)
    else:
      targets = mixup.smooth_one_hot(labels, self.num_classes, 0.0)
    logits = self.model.apply({"params": params}, images, train=train,
                              rngs={"drop_path": drop_rng})
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    # Accuracy against the dominant (mixed) target: a training-progress signal only.
    metrics = {"loss": loss,
               "accuracy": classifier_base.accuracy(logits, jnp.argmax(targets, axis=-1))}
    return loss, (metrics, extra)

  def eval_metrics(self, params, extra, batch):
    logits = self.model.apply({"params": params}, batch["image"], train=False)
    return classifier_base.classification_sums(logits, batch["label"], batch["mask"])

  def encoder_params(self, params, extra):
    return params["encoder"]
