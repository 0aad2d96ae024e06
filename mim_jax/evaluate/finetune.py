"""End-to-end fine-tuning of a pre-trained encoder with a classification head.

The MAE / BEiT recipe: learned position embeddings initialised from the pre-trained (sin-cos)
ones and resized when the patch grid changes, drop path, Mixup / CutMix with label smoothing
(on device, inside the jitted step), AdamW with layer-wise lr decay and masked weight decay,
warmup + cosine (configs/finetune_*.py). With `init_from` empty the same recipe trains the ViT
from scratch (the supervised baseline).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax

from mim_jax.config import validation as v
from mim_jax.convert import our_weights
from mim_jax.evaluate import classifier_base, mixup
from mim_jax.methods import base
from mim_jax.models import flops
from mim_jax.models.heads import ViTClassifier
from mim_jax.models.vit import VIT_SIZES, encoder_from_config
from mim_jax.weights import pretrained


class FineTune(base.Method):
  """Fine-tuning as the training loop sees it: params = {"encoder", "head"[, "fc_norm"]}."""

  name = "finetune"
  kind = "classifier"
  evaluates = True
  shards = False  # Mixup / CutMix pair images within the batch a step sees

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    classifier_base.add_classifier_config(
        c, pool=None, head_init_std=None, label_smoothing=None, mixup_alpha=None,
        cutmix_alpha=None, mixup_prob=None, mixup_switch_prob=None)
    classifier_base.add_scored_config(c)
    # An init_from that holds a classifier head (a fine-tuning workdir, an imported fine-tuned
    # classifier, e.g. an official MAE one) of this model's classes and pooling: fine-tuning
    # continues from it (classifier.head_init_std then does nothing). False trains a new head.
    c.classifier.reuse_head = True
    c.optimizer.layer_decay = 1.0  # < 1: layer-wise lr decay (pre-trained encoders)
    # The encoder size (B, L, H: a model.variant size name) whose published hyper-parameters
    # the config holds (configs/finetune_imagenet.py:size=...). An evaluation takes its
    # encoder's shape from init_from, so without this a ViT-L encoder under the ViT-B recipe
    # would fine-tune with B's lr, layer decay and drop path unnoticed: adopt_encoder_config
    # refuses an encoder of another size. "" accepts any encoder.
    c.recipe_size = ""
    # The fine-tuned classifier as the run's end product, in workdir/encoder (see `export`).
    c.export_encoder = True

  @classmethod
  def unread_rules(cls):
    def mixing(both):
      def reads(config):
        alphas = (config.classifier.mixup_alpha > 0, config.classifier.cutmix_alpha > 0)
        return all(alphas) if both else any(alphas)
      return reads
    # mixup_prob=0 turns both off whatever the alphas (evaluate/mixup.py: mix_batch), and
    # alphas of 0 leave mixup_prob nothing to apply: each refuses the other's settings.
    return [(("classifier.reuse_head",), lambda c: pretrained.has_released_head(c.init_from),
             "init_from holds no classifier head (an export's classifier/ folder) to take"),
            (("classifier.mixup_prob",), mixing(both=False),
             "Mixup and CutMix are both off (mixup_alpha = cutmix_alpha = 0)"),
            (("classifier.mixup_alpha", "classifier.cutmix_alpha",
              "classifier.mixup_switch_prob"), lambda c: c.classifier.mixup_prob > 0,
             "Mixup and CutMix are never applied (classifier.mixup_prob=0); "
             "label_smoothing still is"),
            (("classifier.mixup_switch_prob",), mixing(both=True),
             "it chooses between Mixup and CutMix, which needs both mixup_alpha and "
             "cutmix_alpha > 0")]

  @classmethod
  def validate(cls, config):
    classifier_base.validate_scored(config)
    c, opt = config.classifier, config.optimizer
    for field, value in (("classifier.reuse_head", c.reuse_head),
                         ("export_encoder", config.export_encoder)):
      v.require(isinstance(value, bool), field, value, "True or False")
    v.require(config.recipe_size == "" or config.recipe_size in VIT_SIZES, "recipe_size",
              config.recipe_size, f"'' (any encoder) or one of {sorted(VIT_SIZES)}")
    if not pretrained.is_pretrained(config.init_from):  # init_from's encoder: when adopted
      pretrained.refuse_other_recipe_size(
          config, config.model, "the config's model.* (trained from scratch: no init_from)")
    v.require(v.is_number(c.label_smoothing) and 0 <= c.label_smoothing < 1,
              "classifier.label_smoothing", c.label_smoothing, "a number in [0, 1)")
    for name in ("mixup_alpha", "cutmix_alpha"):
      v.require(v.is_number(c[name]) and c[name] >= 0, f"classifier.{name}", c[name],
                "a number >= 0 (0 disables it)")
    for name in ("mixup_prob", "mixup_switch_prob"):
      v.require(v.is_number(c[name]) and 0 <= c[name] <= 1, f"classifier.{name}", c[name],
                "a probability in [0, 1]")
    v.require(v.is_number(opt.layer_decay) and 0 < opt.layer_decay <= 1,
              "optimizer.layer_decay", opt.layer_decay,
              "a number in (0, 1] (1 disables layer-wise lr decay)")
    v.require(opt.layer_decay == 1 or pretrained.is_pretrained(config.init_from),
              "optimizer.layer_decay", opt.layer_decay,
              "1.0 without init_from: layer-wise lr decay protects pre-trained lower layers, "
              "and a from-scratch encoder has none (it would only handicap the baseline)",
              "Set --config.optimizer.layer_decay=1.0 (configs/finetune_fmnist.py:scratch does).")

  @classmethod
  def forward_flops(cls, config):
    encoder = flops.encoder_flops(config.model, config.image_size, config.channels)
    return {"encoder": encoder, "total": encoder}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    # Fine-tuning learns the absolute positions (MAE's recipe); an encoder with relative
    # positions only (imported BEiT, posemb "none") keeps none.
    self.posemb = ("none" if pretrained.encoder_posemb(config.init_from) == "none"
                   else "learn")
    encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                  posemb=self.posemb)
    self.num_classes = classifier_base.num_classes(config)
    self.model = ViTClassifier(encoder=encoder, num_classes=self.num_classes,
                               pool=config.classifier.pool,
                               head_init_std=config.classifier.head_init_std)
    c = config.classifier
    self.mix = dict(mixup_alpha=float(c.mixup_alpha), cutmix_alpha=float(c.cutmix_alpha),
                    prob=float(c.mixup_prob), switch_prob=float(c.mixup_switch_prob),
                    label_smoothing=float(c.label_smoothing))

  def wants_weights(self) -> bool:
    return pretrained.is_pretrained(self.config.init_from)

  def init(self, rng, images):
    return self.model.init(rng, images)["params"], {}

  def load_pretrained(self, params, extra):
    params = dict(params, encoder=pretrained.load_encoder_into(
        params["encoder"], self.config.init_from, grid_hw=self.model.encoder.grid_hw))
    if self.config.classifier.reuse_head:
      params = pretrained.load_classifier_head_into(params, self.config.init_from)
    return params, extra

  def export(self, workdir, params, extra, info):
    """The fine-tuned classifier, laid out as an imported one: workdir/encoder holds the
    encoder with its learned position table (model.json "posemb") and the head beside it
    (classifier/), so that init_from reads the workdir (k-NN, probe, features, a teacher,
    fine-tuning again, which takes the head: classifier.reuse_head) and the converter exports
    it. Collective, as Method.export."""
    parts = {k: params[k] for k in ("encoder",) + our_weights.CLASSIFIER_PARTS if k in params}
    our_weights.write_parts(os.path.join(workdir, "encoder"), parts,
                            dict(info, posemb=self.posemb))

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
