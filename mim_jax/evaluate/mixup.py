"""Mixup / CutMix with label smoothing for fine-tuning, as timm's `Mixup(mode="batch")`
(timm 0.3.2, the version the official MAE fine-tuning pins).

One mixing decision and one lambda per batch; row i is mixed with row B-1-i (timm mixes a batch
with its flip). The MAE fine-tuning recipe is mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
switch_prob=0.5, label_smoothing=0.1 with timm's defaults cutmix_minmax=None, correct_lam=True;
those two are the only behaviours implemented here.

Sampling (`sample_mix_params`) is separate from the deterministic mixing (`apply_mix`) so the
latter can be checked against timm with a fixed lambda and box centre. Everything is jittable:
the branch is a `lax.switch` and the CutMix box is a mask from iota comparisons, so no shape
depends on the random draw.

Under data parallelism apply this to the global batch (as timm does per process on its local
batch): the partner of a row is taken across the whole array passed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# `MixParams.mode` values.
MODE_NONE = 0
MODE_MIXUP = 1
MODE_CUTMIX = 2


@struct.dataclass
class MixParams:
  """The random part of one batch's mixing; all scalars.

  mode int32    MODE_NONE, MODE_MIXUP or MODE_CUTMIX
  lam  float32  the sampled lambda (1 for MODE_NONE); for CutMix, before the area correction
  cy   int32    CutMix box centre row, uniform in [0, H)
  cx   int32    CutMix box centre column, uniform in [0, W)
  """
  mode: jax.Array
  lam: jax.Array
  cy: jax.Array
  cx: jax.Array


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """int [B] -> float32 [B, C] one-hot with timm's smoothing.

  off = smoothing / C everywhere, on = 1 - smoothing + off at the label, so rows sum to 1.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (on - off) + off


def mix_targets(labels: jax.Array, lam: jax.Array, num_classes: int,
                smoothing: float) -> jax.Array:
  """timm `mixup_target`: lam * y + (1 - lam) * y[::-1] with smoothed one-hots; [B] -> [B, C]."""
  y = smooth_one_hot(labels, num_classes, smoothing)
  lam = jnp.asarray(lam, jnp.float32)
  return y * lam + y[::-1] * (1.0 - lam)


def cutmix_bbox_and_lam(image_hw: tuple[int, int], lam: jax.Array, cy: jax.Array,
                        cx: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """timm `rand_bbox` (margin 0) for a given centre, then `correct_lam`.

  The cut is floor(side * sqrt(1 - lam)) per side, centred at (cy, cx), half-widths rounded
  down (so an odd cut loses a pixel, as in timm 0.3.2; timm 1.x rounds the lower edge down and
  the upper one up) and clipped to the image. lam follows the box actually cut either way.

  Returns ((yl, yh, xl, xh) int32 scalars, half-open; lam float32 = 1 - box area / (H * W)).
  """
  img_h, img_w = image_hw
  ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
  cut_h = jnp.floor(img_h * ratio).astype(jnp.int32)
  cut_w = jnp.floor(img_w * ratio).astype(jnp.int32)
  cy = jnp.asarray(cy, jnp.int32)
  cx = jnp.asarray(cx, jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, img_h)
  yh = jnp.clip(cy + cut_h // 2, 0, img_h)
  xl = jnp.clip(cx - cut_w // 2, 0, img_w)
  xh = jnp.clip(cx + cut_w // 2, 0, img_w)
  area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
  return (yl, yh, xl, xh), 1.0 - area / float(img_h * img_w)


# Candidates per Gamma draw in `beta_without_loops`. Marsaglia-Tsang accepts a candidate with
# probability >= 0.95 for shape >= 1 (the shape it samples at), so all 16 are rejected with
# probability < 0.05 ** 16, about 1.5e-21.
GAMMA_CANDIDATES = 16


def _log_gamma_without_loops(rng: jax.Array, alpha: float) -> jax.Array:
  """log of one Gamma(alpha, 1) draw, float32 scalar, with no `while` loop in the compiled code.

  Marsaglia & Tsang (2000): candidates d * (1 + c x)^3 with x ~ N(0, 1), each accepted when
  log u < x^2 / 2 + d - d v + d log v; the first accepted of GAMMA_CANDIDATES independent ones
  has the distribution of the sequential rejection loop (which `jax.random.gamma` runs as a
  `lax.while_loop`); if none is, d itself stands in (probability < 1.5e-21). alpha < 1 draws at
  alpha + 1 and adds log(U) / alpha (their boost, U^(1 / alpha)). In logs, as `jax.random.beta`
  works, because the boost underflows float32 for small alpha.
  """
  k_normal, k_accept, k_boost = jax.random.split(rng, 3)
  shape = alpha + 1.0 if alpha < 1 else alpha
  d = shape - 1.0 / 3.0
  c = 1.0 / (9.0 * d) ** 0.5
  x = jax.random.normal(k_normal, (GAMMA_CANDIDATES,), jnp.float32)
  v = (1.0 + c * x) ** 3
  log_v = jnp.log(jnp.where(v > 0, v, 1.0))  # v <= 0 is rejected; 1.0 keeps the log finite
  log_u = jnp.log(jax.random.uniform(k_accept, (GAMMA_CANDIDATES,), jnp.float32,
                                     minval=jnp.finfo(jnp.float32).tiny))
  accepted = (v > 0) & (log_u < 0.5 * x * x + d - d * v + d * log_v)
  log_draw = jnp.log(d) + log_v[jnp.argmax(accepted)]  # the first accepted one
  if alpha < 1:
    u = jax.random.uniform(k_boost, (), jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
    log_draw = log_draw + jnp.log(u) / alpha
  return log_draw


def beta_without_loops(rng: jax.Array, a: float, b: float) -> jax.Array:
  """One Beta(a, b) draw, float32 scalar in [0, 1], as X / (X + Y) = sigmoid(log X - log Y)
  with X ~ Gamma(a) and Y ~ Gamma(b), sampled without `while` loops.

  `jax.random.beta` rejects in `while` loops (45 of them in the compiled mixing step), and
  XLA:GPU reads each loop's condition on the host, one round trip per iteration. That costs
  every fine-tuning step with Mixup/CutMix host round trips; processes sharing one GPU wait
  for their turn at each of them.
  """
  k_a, k_b = jax.random.split(rng)
  return jax.nn.sigmoid(_log_gamma_without_loops(k_a, a) - _log_gamma_without_loops(k_b, b))


def sample_mix_params(rng: jax.Array, image_hw: tuple[int, int], *, mixup_alpha: float,
                      cutmix_alpha: float, prob: float, switch_prob: float) -> MixParams:
  """timm `Mixup._params_per_batch` plus the box centre of `rand_bbox`.

  With probability `prob` the batch is mixed: by CutMix with probability `switch_prob` when
  both alphas are > 0 (otherwise by whichever is enabled), lam ~ Beta(alpha, alpha) of the
  chosen method (`beta_without_loops`). The centre is drawn whatever the mode so the draw
  count is static.
  """
  img_h, img_w = image_hw
  k_apply, k_switch, k_mixup, k_cutmix, k_cy, k_cx = jax.random.split(rng, 6)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    lam = jnp.where(use_cutmix, beta_without_loops(k_cutmix, cutmix_alpha, cutmix_alpha),
                    beta_without_loops(k_mixup, mixup_alpha, mixup_alpha))
  elif mixup_alpha > 0:
    use_cutmix = jnp.asarray(False)
    lam = beta_without_loops(k_mixup, mixup_alpha, mixup_alpha)
  elif cutmix_alpha > 0:
    use_cutmix = jnp.asarray(True)
    lam = beta_without_loops(k_cutmix, cutmix_alpha, cutmix_alpha)
  else:
    apply = jnp.asarray(False)
    use_cutmix = jnp.asarray(False)
    lam = jnp.asarray(1.0)
  # Beta draws are in [0, 1] mathematically; the clip guards sqrt(1 - lam) against rounding.
  lam = jnp.clip(lam.astype(jnp.float32), 0.0, 1.0)
  mode = jnp.where(apply, jnp.where(use_cutmix, MODE_CUTMIX, MODE_MIXUP), MODE_NONE)
  return MixParams(
      mode=mode.astype(jnp.int32),
      lam=jnp.where(apply, lam, 1.0),
      cy=jax.random.randint(k_cy, (), 0, img_h, jnp.int32),
      cx=jax.random.randint(k_cx, (), 0, img_w, jnp.int32))


def apply_mix(images: jax.Array, labels: jax.Array, params: MixParams, *, num_classes: int,
              label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Deterministic part of timm `Mixup._mix_batch` + `mixup_target` for given params.

  Args:
    images: [B, H, W, C]. Floating dtypes are kept; integer images are promoted to float32
      because a mixup blend is not an integer.
    labels: int [B].
    params: from `sample_mix_params` (or built by hand).

  Returns:
    (images [B, H, W, C], soft targets float32 [B, num_classes]). The targets use the lambda
    actually applied: the sampled one for mixup, the box-area corrected one for CutMix, 1 for
    no mixing.
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  _, img_h, img_w, _ = images.shape
  flipped = images[::-1]

  def no_mix():
    return images, jnp.float32(1.0)

  def mixup():
    # Blend in float32 so bf16 images do not also round lambda.
    lam = params.lam.astype(jnp.float32)
    mixed = images.astype(jnp.float32) * lam + flipped.astype(jnp.float32) * (1.0 - lam)
    return mixed.astype(images.dtype), lam

  def cutmix():
    (yl, yh, xl, xh), lam = cutmix_bbox_and_lam((img_h, img_w), params.lam, params.cy,
                                                params.cx)
    rows = jax.lax.broadcasted_iota(jnp.int32, (img_h, img_w), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (img_h, img_w), 1)
    in_box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)  # [H, W]
    return jnp.where(in_box[None, :, :, None], flipped, images), lam

  mixed, lam = jax.lax.switch(params.mode, [no_mix, mixup, cutmix])
  return mixed, mix_targets(labels, lam, num_classes, label_smoothing)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
              switch_prob: float = 0.5, label_smoothing: float = 0.1
              ) -> tuple[jax.Array, jax.Array]:
  """Mixup / CutMix one batch as timm `Mixup(mode="batch", correct_lam=True)`.

  Args:
    rng: PRNG key for this batch.
    images: [B, H, W, C]; B should be even (timm asserts it), with odd B the middle row is
      paired with itself and so left unchanged.
    labels: int [B].
    num_classes, mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing: as in timm;
      the defaults are the MAE fine-tuning recipe. The hyper-parameters are Python floats,
      static under jit.

  Returns:
    (images [B, H, W, C], soft targets float32 [B, num_classes]). With both alphas 0 or
    prob 0, the images come back untouched and the targets are smoothed one-hots.
  """
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, smooth_one_hot(labels, num_classes, label_smoothing)
  params = sample_mix_params(rng, images.shape[1:3], mixup_alpha=mixup_alpha,
                             cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob)
  return apply_mix(images, labels, params, num_classes=num_classes,
                   label_smoothing=label_smoothing)
