"""data2vec 2.0 (Baevski et al., 2023, "Efficient Self-supervised Learning with Contextualized
Target Representations for Vision, Speech and Language"), vision.

What makes it efficient, each a shared part composed here:
  * a visible-only student: the ViT encodes only the unmasked patches (`ViTEncoder(ids_keep=)`,
    as MAE's encoder), so its cost scales with the 20% of patches it keeps;
  * several masks per image sharing one teacher pass: every image of the batch is masked
    `masking.num_masks` times (the release's clone_batch, 16 on ImageNet); the EMA teacher
    encodes the unmasked image once and its targets serve all copies;
  * inverse block masking (`masking.kind='inverse_block'`): blocks of patches stay visible and
    everything else is masked, 80% on ImageNet (drawn in the input pipeline, `num_masks` per
    image);
  * a convolutional decoder (`models.decoders.ConvDecoder`): the visible latents go back to
    their grid positions, masked positions hold small Gaussian noise, and grouped 3x3
    convolutions predict the targets there.

Targets are data2vec's (`teachers.layer_average_targets`): the teacher's last `teacher.top_k`
block outputs, each instance-normalised (per channel over the tokens) in the release's image
recipe, averaged and layer-normalised. The loss is the release's `d2v_loss`: the squared error
summed over the D channels and scaled by 1/sqrt(D), averaged over masked patches (sqrt(D)
times the per-element mean), plus `teacher.cls_weight` times the same loss between the
student's final [CLS] token and the mean of the targets over all patches (the release's
cls_loss; see configs/data2vec2_vitb.py for how its weight maps). Its units are the
release's, so that the recipe's gradient clipping (4.0) clips what it clips there. The
teacher follows the student's encoder as in data2vec (`teachers.ema_update`, decay annealed
linearly).

Differences from the release, all of the model rather than the method: the release's image
blocks are post-LayerNorm and take targets from each block's feed-forward output before its
residual; mim_jax's ViT is pre-LayerNorm (as MAE, BEiT and data2vec v1) and takes block
outputs. The exported encoder is the student's, as in the release.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax.config import validation as v
from mim_jax.methods import data2vec
from mim_jax.methods.base import PretrainingMethod
from mim_jax.models import flops
from mim_jax.models.decoders import ConvDecoder
from mim_jax.models.vit import encoder_from_config, size_from_config
from mim_jax.objectives import losses, masking, teachers


class Data2Vec2(data2vec.Data2Vec):
  """data2vec 2.0 as the training loop sees it; the EMA teacher, its schedule, its targets and
  continued pre-training are data2vec's (`data2vec.Data2Vec`)."""

  name = "data2vec2"
  mask_token_in_encoder = False  # the student encodes the visible patches only
  head_in_vit = False  # a convolutional decoder with its own init

  @classmethod
  def add_config(cls, c):
    super().add_config(c)  # data2vec's fields; masking and teacher replaced below
    # num_masks: masks (student copies) per image, all sharing one teacher pass.
    c.masking.update(kind="inverse_block", ratio=0.8, block=3, adjust=0.07)
    c.masking.num_masks = 16
    # The convolutional decoder (module docstring).
    c.decoder = ml_collections.ConfigDict(dict(width=768, depth=6, kernel=3, groups=16,
                                               noise_std=0.01))
    # The EMA teacher (data2vec's fields, without loss_beta: the loss is squared error) and
    # the weight of the [CLS] loss.
    c.teacher = ml_collections.ConfigDict(dict(
        ema_decay=0.9998, ema_end_decay=0.99999, ema_anneal_fraction=0.27, top_k=10,
        block_norm="instance", final_norm="layer", cls_weight=2.56))

  @classmethod
  def validate(cls, config):
    v.validate_pretraining_fields(config, mask_kinds=v.FIXED_COUNT_MASK_KINDS, fixed_count=True)
    data2vec.validate_ema_teacher(config)
    v.positive_int(config, "masking.num_masks")
    d, width = config.decoder, size_from_config(config.model)[0].width
    for name in ("width", "depth", "kernel", "groups"):
      v.positive_int(config, f"decoder.{name}")
    v.require(d.kernel % 2 == 1, "decoder.kernel", d.kernel, "an odd number ('same' padding)")
    v.require(width % d.groups == 0 and d.width % d.groups == 0, "decoder.groups", d.groups,
              f"a divisor of the encoder width {width} and of decoder.width={d.width}")
    v.require(v.is_number(d.noise_std) and d.noise_std >= 0, "decoder.noise_std", d.noise_std,
              "a number >= 0 (the std of the noise at masked positions; 0.01)")
    w = config.teacher.cls_weight
    v.require(v.is_number(w) and w >= 0, "teacher.cls_weight", w,
              "a number >= 0 (0: no [CLS] loss)")

  @classmethod
  def forward_flops(cls, config):
    # Per image: the student encodes the visible patches of each of its num_masks copies and
    # the decoder runs over the whole grid of each; the teacher encodes the image once.
    size, patch = size_from_config(config.model)
    grid = (config.image_size[0] // patch, config.image_size[1] // patch)
    n, copies, d = grid[0] * grid[1], int(config.masking.num_masks), config.decoder
    visible = n - masking.mask_generator_from_config(config.masking, grid, patch).num_masked
    student = copies * flops.encoder_flops(config.model, config.image_size, config.channels,
                                           visible)
    teacher = flops.encoder_flops(config.model, config.image_size, config.channels)
    conv = sum(2 * d.kernel**2 * ((size.width if i == 0 else d.width) // d.groups) * d.width
               for i in range(d.depth))
    decoder = float(copies * n * (conv + 2 * d.width * size.width))
    return {"encoder": student, "decoder": decoder, "teacher": teacher,
            "total": student + decoder + teacher}

  def __init__(self, config, length=None):
    PretrainingMethod.__init__(self, config, length)
    self.encoder = encoder_from_config(config.model, config.image_size, config.channels)
    d = config.decoder
    self.decoder = ConvDecoder(
        grid_hw=self.encoder.grid_hw, out_dim=self.encoder.width, width=int(d.width),
        depth=int(d.depth), kernel=int(d.kernel), groups=int(d.groups),
        noise_std=float(d.noise_std), dtype=jnp.dtype(config.model.dtype))
    self.teacher = self.encoder.clone(drop_path_rate=0.0)  # same parameters, no stochastic depth
    self.grid_hw = self.encoder.grid_hw
    self.mask_generator = masking.mask_generator_from_config(
        config.masking, self.grid_hw, self.encoder.patch_size)
    self.masks_per_image = int(config.masking.num_masks)
    self.num_keep = self.grid_hw[0] * self.grid_hw[1] - self.mask_generator.num_masked
    self.read_teacher_fields(config.teacher)
    self.cls_weight = float(config.teacher.cls_weight)

  # --- model -----------------------------------------------------------------------------------
  def init(self, rng, images):
    enc_rng, dec_rng = jax.random.split(rng)
    encoder = self.encoder.init({"params": enc_rng}, images)["params"]
    n = self.grid_hw[0] * self.grid_hw[1]
    ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (images.shape[0], n))
    visible = jnp.zeros((images.shape[0], self.num_keep, self.encoder.width))
    decoder = self.decoder.init({"params": dec_rng}, visible, ids)["params"]
    extra = {"teacher": jax.tree.map(jnp.copy, encoder),
             "ema_decay": self.ema_decay(jnp.zeros([], jnp.int32))}
    return {"encoder": encoder, "decoder": decoder}, extra

  def loss(self, params, extra, batch, rng, train=True):
    mask_rng, drop_rng, noise_rng = jax.random.split(rng, 3)
    images = batch["image"]
    # [B * M, N]: each image's M masks adjacent, like the copies below.
    mask = self.mask_generator.sample(batch, mask_rng, per_image=self.masks_per_image)
    info = masking.mask_to_ids(mask, num_keep=self.num_keep)
    target = self.targets(extra["teacher"], images)  # [B, N, D]: one teacher pass per image
    copies = jnp.repeat(images, self.masks_per_image, axis=0)
    latent, _ = self.encoder.apply({"params": params["encoder"]}, copies,
                                   ids_keep=info.ids_keep, train=train,
                                   rngs={"drop_path": drop_rng})
    pred = self.decoder.apply({"params": params["decoder"]}, latent[:, 1:], info.ids_restore,
                              rngs={"mask_noise": noise_rng})
    target_copies = jnp.repeat(target, self.masks_per_image, axis=0)
    # The release's d2v_loss: summed over channels, scaled by 1/sqrt(D) = sqrt(D) x the mean.
    scale = float(np.sqrt(target.shape[-1]))
    regression = scale * losses.masked_mse(pred, target_copies, info.mask, self.axis_name)
    cls_target = jnp.repeat(target.mean(axis=1), self.masks_per_image, axis=0)
    cls_loss = scale * jnp.mean(jnp.square(latent[:, 0].astype(jnp.float32) - cls_target))
    loss = regression + self.cls_weight * cls_loss
    metrics = {"loss": loss, "regression_loss": regression, "cls_loss": cls_loss,
               "mask_fraction": jnp.mean(info.mask), "ema_decay": extra["ema_decay"],
               "target_std": teachers.feature_std(target_copies, info.mask, self.axis_name),
               "pred_std": teachers.feature_std(pred, info.mask, self.axis_name)}
    return loss, (metrics, extra)
