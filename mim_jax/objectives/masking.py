"""Mask generators: pure functions of their own rng (or of explicit noise).

Convention: N is the number of patches of a (gh, gw) patch grid in row-major order (the order
of the patch embedding). `MaskInfo.mask` is float32 [B, N] with 1 = masked (to predict) and
0 = visible; the spatial generators below return bool [B, N] with True = masked, which
`mask_to_ids` turns into a `MaskInfo` when every row has the same count.

  random_masking         MAE: uniform per-patch masking (on device, jittable)
  random_grouped_mask    SimMIM: uniform masking of group x group patch squares (on device)
  blockwise_mask         BEiT: rectangles placed until a budget is spent (host, NumPy)
  inverse_block_mask     data2vec 2.0: visible blocks, everything else masked (host, NumPy)

`MaskGenerator` is one of them as configured by `config.masking`, the part a method composes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class MaskInfo:
  """The result of per-sample random masking.

  ids_keep    int32 [B, K]   indices of the visible patches, in shuffled order
  ids_restore int32 [B, N]   argsort of the shuffle: undoes it (visible first, then masked)
  mask        float32 [B, N] 1 = masked, 0 = visible
  """
  ids_keep: jax.Array
  ids_restore: jax.Array
  mask: jax.Array


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Number of visible patches, `int(N * (1 - ratio))` exactly as the official MAE code."""
  return int(num_patches * (1 - mask_ratio))


def random_masking_from_noise(noise: jax.Array, mask_ratio: float) -> MaskInfo:
  """Per-sample random masking from uniform noise [B, N]: the lowest-noise patches stay visible.

  Identical noise gives masks identical to the official MAE and HF ViTMAE implementations.
  """
  chex.assert_rank(noise, 2)
  b, n = noise.shape
  keep = num_visible(n, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  shuffled_mask = jnp.concatenate(
      [jnp.zeros((b, keep), jnp.float32), jnp.ones((b, n - keep), jnp.float32)], axis=1)
  mask = jnp.take_along_axis(shuffled_mask, ids_restore, axis=1)
  return MaskInfo(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


def random_masking(rng: jax.Array, batch_size: int, num_patches: int,
                   mask_ratio: float) -> MaskInfo:
  """Per-sample random masking (MAE) driven by its own rng."""
  noise = jax.random.uniform(rng, (batch_size, num_patches), jnp.float32)
  return random_masking_from_noise(noise, mask_ratio)


# ---------------------------------------------------------------------------------------------
# Spatial mask generators.


def random_grouped_mask(rng: jax.Array, batch: int, grid_hw: tuple[int, int], ratio: float,
                        group: int) -> jax.Array:
  """SimMIM's random masking of square groups of patches (Xie et al. 2022, "SimMIM").

  SimMIM masks at a coarser "mask patch" size than the model's patch size (e.g. 32-px mask
  patches over a 16-px patch grid, so `group` = 32 // 16 = 2). On the (gh / group, gw / group)
  group grid of T cells exactly `int(ceil(T * ratio))` cells are masked per sample, chosen
  uniformly without replacement (the official `MaskGenerator` rule), and each cell is then
  upsampled to its group x group patches.

  Args:
    rng: jax PRNG key.
    batch: B (static).
    grid_hw: (gh, gw) patch grid (static); both must be divisible by `group`.
    ratio: fraction of groups to mask (static).
    group: side of a mask group in patches (static), `mask_patch_size // model_patch_size`.

  Returns:
    bool [B, gh * gw], True = masked; every row has `int(ceil(T * ratio)) * group**2` True.
  """
  gh, gw = grid_hw
  if group < 1 or gh % group or gw % group:
    raise ValueError(f"group {group} must be >= 1 and divide the patch grid {grid_hw}")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio must be in [0, 1], got {ratio}")
  rh, rw = gh // group, gw // group
  token_count = rh * rw
  # Same expression as SimMIM's data/data_simmim.py so that counts agree at every ratio.
  mask_count = int(np.ceil(token_count * ratio))
  # A uniform random permutation per sample: the ranks of iid uniform noise. Masking the
  # lowest `mask_count` ranks equals SimMIM's `np.random.permutation(T)[:mask_count]`.
  noise = jax.random.uniform(rng, (batch, token_count))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  cells = (ranks < mask_count).reshape(batch, rh, rw)
  patches = jnp.repeat(jnp.repeat(cells, group, axis=1), group, axis=2)  # [B, gh, gw]
  return patches.reshape(batch, gh * gw)


def _host_generator(rng: jax.Array | np.random.Generator) -> np.random.Generator:
  """A NumPy generator for host-side sampling: used as is, or seeded from a jax key.

  Seeding from `jax.random.bits` keeps the host generators pure functions of the jax rng, like
  the on-device ones: the same key always gives the same masks.
  """
  if isinstance(rng, np.random.Generator):
    return rng
  seed = np.asarray(jax.random.bits(rng, (4,), jnp.uint32))
  return np.random.default_rng(seed)


def _beit_place_block(gen: np.random.Generator, mask: np.ndarray, max_mask_patches: int,
                      min_block: int, log_aspect: tuple[float, float]) -> int:
  """One call of BEiT's `MaskingGenerator._mask`: up to 10 rectangle attempts, in place.

  mask: int [gh, gw] (1 = masked), updated in place. Returns the number of newly masked patches
  (0 when all 10 attempts failed). The draws happen in the reference's order so that the same
  generator state gives the same mask.
  """
  height, width = mask.shape

  def uniform(a: float, b: float) -> float:
    # Python's random.uniform: also defined for b < a, which happens whenever the budget left
    # is below min_block (np.random.Generator.uniform rejects that).
    return a + (b - a) * gen.random()

  delta = 0
  for _ in range(10):
    target_area = uniform(min_block, max_mask_patches)
    aspect_ratio = math.exp(uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect_ratio)))
    w = int(round(math.sqrt(target_area / aspect_ratio)))
    # Strict `<` as in the reference: a rectangle never spans the whole grid side.
    if w < width and h < height:
      # Python's random.randint is inclusive on both ends.
      top = int(gen.integers(0, height - h + 1))
      left = int(gen.integers(0, width - w + 1))
      window = mask[top:top + h, left:left + w]
      new = h * w - int(window.sum())
      # Accept only a rectangle that adds at least one patch and at most the remaining budget.
      if 0 < new <= max_mask_patches:
        window[...] = 1
        delta += new
      if delta > 0:
        break
  return delta


def blockwise_mask(rng: jax.Array | np.random.Generator, batch: int, grid_hw: tuple[int, int],
                   num_masked: int, min_block: int = 16, max_block: int | None = None,
                   min_aspect: float = 0.3, max_aspect: float | None = None,
                   exact: bool = False) -> np.ndarray:
  """BEiT's blockwise masking (Bao et al. 2022, "BEiT"; unilm beit/masking_generator.py).

  Rectangles with area uniform in [min_block, min(max_block, budget left)] and log-uniform
  aspect ratio in [min_aspect, max_aspect] (default 1 / min_aspect) are placed at a uniform
  top-left corner. A rectangle counts only its newly masked patches and is accepted only when
  it adds between 1 and the remaining budget; each block gets at most 10 attempts, and the
  loop stops when `num_masked` is reached or a block makes no progress. So a row never has more
  than `num_masked` masked patches and usually has exactly that many (BEiT: 75 of 14 x 14).

  This runs on the host in NumPy, as BEiT does in its data loader: each rectangle's acceptance
  depends on the mask built so far, a data-dependent loop of variable length that has no
  static-shape form under jit. Call it in the input pipeline and feed the mask to the step.

  Args:
    rng: jax PRNG key (seeds a NumPy generator), or a `np.random.Generator` to draw from.
    batch: B; samples are drawn one after another from the same generator.
    grid_hw: (gh, gw) patch grid.
    num_masked: masking budget per sample (BEiT `num_mask_patches`, 75 for 14 x 14).
    min_block: minimum rectangle area in patches (BEiT `min_mask_patches_per_block`, 16).
    max_block: maximum rectangle area; None means `num_masked`.
    min_aspect: minimum aspect ratio h / w (BEiT 0.3).
    max_aspect: maximum aspect ratio; None means 1 / min_aspect.
    exact: a row the blocks leave short gets its missing patches at random among the unmasked
      ones, so every row has exactly `num_masked` (BEiT v2's beit2/masking_generator.py; BEiT
      v1's rows fall short: 31% of 4,000 rows on 14 x 14 at 78, by up to 8 patches).

  Returns:
    np.ndarray bool [B, gh * gw], True = masked, at most `num_masked` True per row.
  """
  gh, gw = grid_hw
  if not 0 <= num_masked <= gh * gw:
    raise ValueError(f"num_masked must be in [0, {gh * gw}], got {num_masked}")
  if min_aspect <= 0:
    raise ValueError(f"min_aspect must be positive, got {min_aspect}")
  gen = _host_generator(rng)
  max_block = num_masked if max_block is None else max_block
  max_aspect = max_aspect or 1 / min_aspect
  log_aspect = (math.log(min_aspect), math.log(max_aspect))
  out = np.zeros((batch, gh * gw), bool)
  for b in range(batch):
    mask = np.zeros((gh, gw), np.int64)
    count = 0
    while count < num_masked:
      budget = min(num_masked - count, max_block)
      delta = _beit_place_block(gen, mask, budget, min_block, log_aspect)
      if delta == 0:
        break
      count += delta
    flat = mask.reshape(-1).astype(bool)
    if exact and count < num_masked:
      flat[gen.choice(np.flatnonzero(~flat), num_masked - count, replace=False)] = True
    out[b] = flat
  return out


def inverse_block_mask(rng: jax.Array | np.random.Generator, batch: int,
                       grid_hw: tuple[int, int], ratio: float, block: int = 3,
                       adjust: float = 0.07) -> np.ndarray:
  """data2vec 2.0's inverse block masking (Baevski et al. 2023, "Efficient Self-supervised
  Learning with Contextualized Target Representations for Vision, Speech and Language";
  fairseq `compute_block_mask_2d` with inverse_mask=True, require_same_masks=True).

  Blocks of the *visible* region are sampled and everything else is masked, so the visible
  context is a few contiguous blocks. With keep = 1 - ratio:
    1. `int(N * (keep + adjust) / block**2)` block centres are drawn uniformly over the N
       patches (with replacement); each marks the block x block square spanning
       [c - block // 2, c - block // 2 + block) in both axes, cut at the grid edge.
    2. Every row is then brought to exactly `int(N * keep)` visible patches (the reference's
       require_same_masks=True, which the image modality always passes): surplus visible
       patches are masked uniformly at random among the visible ones, a shortfall is filled
       with uniformly chosen extra visible patches.
    3. The complement is the mask.
  The visible count is therefore `num_visible(N, ratio)` for every row, so |masked fraction -
  ratio| < 1 / N and `mask_to_ids` applies. Defaults are data2vec 2.0's ImageNet setting
  (mask_length 3, mask_prob_adjust 0.07; the paper uses ratio 0.8).

  Differences from the reference: a rectangular (gh, gw) grid instead of a square one of side
  int(sqrt(N)); no mask_dropout, expand_adjcent or non_overlapping options (all off in the
  data2vec 2.0 image configs); NumPy instead of torch random streams; block = 1 is allowed.
  Host-side for the same reason as `blockwise_mask`: the per-row equalisation draws a
  data-dependent number of patches.

  Args:
    rng: jax PRNG key (seeds a NumPy generator), or a `np.random.Generator` to draw from.
    batch: B.
    grid_hw: (gh, gw) patch grid.
    ratio: masked fraction (data2vec `mask_prob`).
    block: side of a visible block in patches (data2vec `mask_length`).
    adjust: extra keep probability for the centre count, compensating block overlap
      (data2vec `mask_prob_adjust`).

  Returns:
    np.ndarray bool [B, gh * gw], True = masked, exactly N - int(N * (1 - ratio)) per row.
  """
  gh, gw = grid_hw
  n = gh * gw
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio must be in [0, 1], got {ratio}")
  gen = _host_generator(rng)
  keep_prob = 1 - ratio
  num_centers = int(n * ((keep_prob + adjust) / block**2))
  target = int(n * keep_prob)
  # All centres for the batch first, then the per-row equalisation, as the reference does.
  centers = gen.integers(0, n, size=(batch, num_centers))
  offsets = np.arange(block) - block // 2
  rows = np.clip(centers[:, :, None] // gw + offsets, 0, gh - 1)  # [B, C, block]
  cols = np.clip(centers[:, :, None] % gw + offsets, 0, gw - 1)  # [B, C, block]
  keep = np.zeros((batch, gh, gw), bool)
  # Clipping (as the reference's clamp) only repeats edge indices, so it cuts blocks at the edge.
  keep[np.arange(batch)[:, None, None, None], rows[:, :, :, None], cols[:, :, None, :]] = True
  keep = keep.reshape(batch, n)
  for b in range(batch):
    count = int(keep[b].sum())
    if count > target:
      keep[b, gen.choice(np.flatnonzero(keep[b]), count - target, replace=False)] = False
    elif count < target:
      keep[b, gen.choice(np.flatnonzero(~keep[b]), target - count, replace=False)] = True
  return ~keep


def mask_to_ids(mask: jax.Array | np.ndarray, num_keep: int | None = None) -> MaskInfo:
  """The `MaskInfo` of a mask with the same number of visible patches in every row.

  Lets visible-only encoders (MAE-style gathering with `ids_keep`) consume any generator with
  fixed counts. The "shuffle" is a stable sort: visible patches first in increasing index
  order, then masked ones in increasing order, so `ids_keep` lists each row's visible patches
  in grid order and `ids_restore` puts them (and the masked slots after them) back in place.

  Args:
    mask: bool or {0, 1} [B, N], True / 1 = masked.
    num_keep: K, the visible count per row. None reads it from a concrete mask, which must then
      have equal counts in every row (ValueError otherwise). Under jit the mask is a tracer
      whose counts are unknown, so K must be given and rows are assumed to agree.

  Returns:
    MaskInfo with ids_keep int32 [B, K], ids_restore int32 [B, N], mask float32 [B, N].
  """
  if not isinstance(mask, jax.core.Tracer):
    # Concrete input (NumPy or a materialised jax array): check the counts on the host.
    host = np.asarray(mask).astype(bool)
    visible = host.shape[1] - host.sum(axis=1)
    if visible.size and not (visible == visible[0]).all():
      raise ValueError(f"mask rows have different visible counts: {sorted(set(visible.tolist()))}")
    count = int(visible[0]) if visible.size else 0
    if num_keep is None:
      num_keep = count
    elif num_keep != count and visible.size:
      raise ValueError(f"num_keep={num_keep} but the mask has {count} visible patches per row")
  elif num_keep is None:
    raise ValueError("num_keep is required when the mask is traced (under jit)")
  mask = jnp.asarray(mask).astype(jnp.float32)
  # A stable sort of the 0/1 mask keeps grid order within the visible and the masked groups.
  ids_shuffle = jnp.argsort(mask, axis=1, stable=True).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True).astype(jnp.int32)
  return MaskInfo(ids_keep=ids_shuffle[:, :num_keep], ids_restore=ids_restore, mask=mask)


# ---------------------------------------------------------------------------------------------
def attention_guided_mask(scores: jax.Array, num_masked: int, random_share: float,
                          rng: jax.Array, order: str = "high") -> jax.Array:
  """AttMask (Kakogeorgiou et al., 2022): mask the patches a teacher attends to most ("high")
  or least ("low"), with a share drawn at random instead.

  scores [B, N] (e.g. the teacher's last-layer [CLS] attention averaged over heads) ->
  bool [B, N] with exactly `num_masked` True per row: the round(num_masked * (1 -
  random_share)) patches ranked first by `order`, plus the rest drawn uniformly from the
  remaining patches. Ties break by position.
  """
  b, n = scores.shape
  by_attention = int(round(num_masked * (1.0 - random_share)))
  ranked = jnp.argsort(-scores if order == "high" else scores, axis=-1)  # stable
  chosen = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], ranked[:, :by_attention]].set(
      True)
  noise = jnp.where(chosen, jnp.inf, jax.random.uniform(rng, (b, n)))
  extra = jnp.argsort(noise, axis=-1)[:, :num_masked - by_attention]
  return chosen.at[jnp.arange(b)[:, None], extra].set(True)


# Mask generators as configured parts of a method.

MASK_KINDS = ("random", "grouped", "blockwise", "inverse_block")
# Drawn from a teacher's attention inside the step: only methods with a teacher offer it.
ATTENTION_KIND = "attention"
ATTENTION_ORDERS = ("high", "low")
# Kinds drawn on the host, in the input pipeline (data-dependent loops, see `blockwise_mask`).
HOST_MASK_KINDS = ("blockwise", "inverse_block")
# The batch key under which host-drawn masks reach the train step: bool [B, N], True = masked.
TOKEN_MASK_KEY = "token_mask"


@dataclasses.dataclass(frozen=True)
class MaskGenerator:
  """One configured mask generator over a (gh, gw) patch grid (`config.masking`).

  kind            "random" (MAE), "grouped" (SimMIM), "blockwise" (BEiT), "inverse_block"
                  (data2vec 2.0); see the functions above for each rule.
  ratio           target masked fraction.
  group           grouped: side of a mask group in patches (mask_patch_size // patch_size).
  min_block       blockwise: minimum rectangle area in patches.
  min_aspect      blockwise: minimum aspect ratio (maximum is its inverse).
  exact_count     blockwise: top up a short mask to exactly its budget (BEiT v2).
  block           inverse_block: side of a visible block in patches.
  adjust          inverse_block: extra keep probability for the block-centre count.
  ratio_range     () uses `ratio` for every sample; (lo, hi) draws each sample's ratio
                  uniformly from it (iBOT's pred_ratio +- pred_ratio_var).
  mask_probability  each sample is masked with this probability and left whole otherwise
                  (iBOT masks half of the views: pred_ratio (0, 0.3)).
                  Either makes the ratio vary per sample (`variable_ratio`): such masks are
                  drawn by `host` only, for any kind (iBOT's 'block' and 'rand' shapes alike).
  attention_order, random_share  attention (AttMask): mask the patches a teacher attends to
                  most ("high") or least ("low"), `random_share` of them drawn at random
                  instead; drawn in the step from the teacher's scores (`from_scores`).

  Device kinds are drawn inside the jitted step from the step's rng (`sample`); host kinds (and
  any kind with a variable ratio, `on_host`) are drawn per example in the input pipeline
  (`host`) and arrive as batch[TOKEN_MASK_KEY].
  """
  kind: str
  grid_hw: tuple[int, int]
  ratio: float
  group: int = 1
  min_block: int = 16
  min_aspect: float = 0.3
  exact_count: bool = False
  block: int = 3
  adjust: float = 0.07
  ratio_range: tuple[float, ...] = ()
  mask_probability: float = 1.0
  attention_order: str = "high"
  random_share: float = 0.0

  @property
  def num_patches(self) -> int:
    return self.grid_hw[0] * self.grid_hw[1]

  @property
  def on_host(self) -> bool:
    return self.kind in HOST_MASK_KINDS or self.variable_ratio

  @property
  def needs_scores(self) -> bool:
    """Whether masks come from a teacher's attention (`from_scores`), not from `sample`."""
    return self.kind == ATTENTION_KIND

  def from_scores(self, scores: jax.Array, rng: jax.Array) -> jax.Array:
    """bool [B, N] from per-patch teacher scores [B, N] (kind "attention")."""
    return attention_guided_mask(scores, self.num_masked, self.random_share, rng,
                                 self.attention_order)

  @property
  def budget(self) -> int:
    """blockwise: the masking budget per sample, int(N * ratio) (BEiT: 75 of 196 at ~0.38)."""
    return int(self.num_patches * self.ratio)

  @property
  def variable_ratio(self) -> bool:
    """Whether each sample draws its own ratio or may stay whole (`ratio_range`,
    `mask_probability` < 1)."""
    return bool(self.ratio_range) or self.mask_probability < 1

  @property
  def num_masked(self) -> int | None:
    """The masked count every sample has, or None when it varies per sample (blockwise, or
    a variable ratio).

    A visible-only encoder (MAE) needs a fixed count: its token sequence has a static length.
    """
    if self.variable_ratio:
      return None
    n = self.num_patches
    if self.kind in ("random", "inverse_block", ATTENTION_KIND):
      return n - num_visible(n, self.ratio)
    if self.kind == "grouped":
      cells = n // self.group**2
      return int(np.ceil(cells * self.ratio)) * self.group**2
    return None

  def device(self, rng: jax.Array, batch: int) -> jax.Array:
    """bool [B, N] drawn on device (random, grouped; at a fixed ratio)."""
    if self.variable_ratio:
      raise ValueError("masks with a per-sample ratio (ratio_range, mask_probability < 1) are "
                       "drawn on the host: call host(rng, batch)")
    if self.kind == "random":
      return random_masking(rng, batch, self.num_patches, self.ratio).mask.astype(bool)
    if self.kind == "grouped":
      return random_grouped_mask(rng, batch, self.grid_hw, self.ratio, self.group)
    if self.needs_scores:
      raise ValueError("masking kind 'attention' draws masks from a teacher's attention: "
                       "call from_scores(scores, rng)")
    raise ValueError(f"masking kind {self.kind!r} is drawn on the host, in the input pipeline")

  def host(self, rng: jax.Array | np.random.Generator, batch: int) -> np.ndarray:
    """np.bool_ [B, N] drawn on the host (any kind; the device kinds through jax on the CPU)."""
    if self.variable_ratio:
      return self._variable(_host_generator(rng), batch)
    if self.kind == "blockwise":
      return blockwise_mask(rng, batch, self.grid_hw, self.budget, min_block=self.min_block,
                            min_aspect=self.min_aspect, exact=self.exact_count)
    if self.kind == "inverse_block":
      return inverse_block_mask(rng, batch, self.grid_hw, self.ratio, block=self.block,
                                adjust=self.adjust)
    if isinstance(rng, np.random.Generator):
      rng = jax.random.key(int(rng.integers(2**31)))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      return np.asarray(self.device(rng, batch))

  def _variable(self, gen: np.random.Generator, batch: int) -> np.ndarray:
    """Masks whose ratio varies per sample (iBOT's ImageFolderMask, for both its 'block' and
    'rand' shapes): a sample is masked with probability `mask_probability`, at a ratio
    r ~ U(ratio_range) (or `ratio`), by this generator's own rule at the fixed ratio r (its
    `host` draw of one sample: blockwise budget int(N * r), random N - int(N * (1 - r))
    patches); the others stay whole. One generator feeds every draw, in sample order."""
    fixed = dataclasses.replace(self, ratio_range=(), mask_probability=1.0)
    out = np.zeros((batch, self.num_patches), bool)
    for b in range(batch):
      if gen.random() >= self.mask_probability:
        continue
      ratio = gen.uniform(*self.ratio_range) if self.ratio_range else self.ratio
      if self.kind == "random":  # in numpy: a jax draw per sample costs ~100x more here
        n = self.num_patches
        out[b, gen.permutation(n)[:n - num_visible(n, float(ratio))]] = True
      else:
        out[b] = dataclasses.replace(fixed, ratio=float(ratio)).host(gen, 1)[0]
    return out

  def sample(self, batch: Mapping[str, jax.Array], rng: jax.Array,
             per_image: int = 1) -> jax.Array:
    """The masks of a training batch, bool [B * per_image, N] (each image's masks adjacent):
    batch[TOKEN_MASK_KEY] for host kinds (the input pipeline drew them, [B, N], or
    [B, per_image, N] when per_image > 1), otherwise drawn here from `rng`."""
    b = batch["image"].shape[0]
    if not self.on_host:
      return self.device(rng, b * per_image)
    if TOKEN_MASK_KEY not in batch:
      raise ValueError(f"masking kind {self.kind!r} draws masks in the input pipeline, but the "
                       f"batch has no {TOKEN_MASK_KEY!r}; build the iterator with the method's "
                       "data transforms (see train.run)")
    mask = batch[TOKEN_MASK_KEY]
    want = (b, self.num_patches) if per_image == 1 else (b, per_image, self.num_patches)
    if mask.shape != want:
      raise ValueError(f"batch[{TOKEN_MASK_KEY!r}] has shape {mask.shape}, expected {want}")
    return mask.reshape(b * per_image, self.num_patches).astype(bool)


def mask_generator_from_config(masking_cfg, grid_hw: tuple[int, int],
                               patch_size: int) -> MaskGenerator:
  """The `MaskGenerator` of `config.masking` for a model with this patch grid and size."""
  mask_patch = masking_cfg.get("mask_patch_size", 0) or patch_size
  return MaskGenerator(
      kind=masking_cfg.kind, grid_hw=tuple(grid_hw), ratio=float(masking_cfg.ratio),
      group=max(1, mask_patch // patch_size), min_block=int(masking_cfg.get("min_block", 16)),
      min_aspect=float(masking_cfg.get("min_aspect", 0.3)),
      exact_count=bool(masking_cfg.get("exact_count", False)),
      block=int(masking_cfg.get("block", 3)), adjust=float(masking_cfg.get("adjust", 0.07)),
      ratio_range=tuple(float(r) for r in masking_cfg.get("ratio_range", ())),
      mask_probability=float(masking_cfg.get("mask_probability", 1.0)),
      attention_order=str(masking_cfg.get("attention_order", "high")),
      random_share=float(masking_cfg.get("random_share", 0.0)))
