"""A linear probe that converges: multinomial logistic regression on cached features.

The MAE probe is BatchNorm without affine parameters + a linear layer. On features computed
once (no augmentation), that BatchNorm at convergence is a standardisation with the training
features' mean and variance, and the head is a multinomial logistic regression; fitted with
full-batch L-BFGS to a small gradient norm it is the same estimator scikit-learn's
`LogisticRegression(solver="lbfgs")` computes, with no learning rate or epoch count to get
wrong. The L2 strength is the one hyper-parameter, chosen on held-out training examples.

  standardizer(x)                    (mean, scale) of training features [N, D]
  fit(x, y, num_classes, l2)         (params, FitInfo): L-BFGS to convergence, from zeros
                                     or from `init` (a warm start)
  accuracy(params, x, y)             top-1 accuracy of fitted params
  select_l2(x, y, x_val, y_val, ...) Selection: the L2 strength with the best validation
                                     accuracy, each fit warm-started from the previous one
  select_l2_many(xs, y, xs_val, ...) one Selection per feature set (e.g. every block), the
                                     sets fitted one after another or together (`together`)

Objective: mean cross-entropy + l2 / 2 * ||W||^2 (bias not penalised), i.e. scikit-learn's
C = 1 / (l2 * N).

Fitting several feature sets together (one vmapped L-BFGS per strength instead of one per set
and strength) is for GPUs: L-BFGS's iterations and line searches are `while` loops,
and XLA:GPU reads each loop condition on the host, so a fit's time there is round trips, not
arithmetic; K sets together should take about the round trips of the slowest one (not yet
timed on a GPU: the sets that converged still run the loop body, line search included). On a
CPU the arithmetic is the cost, and the sets that converged early keep computing until the
last one has, so one by one is the cheaper order there; a TPU runs the loops on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from mim_jax.training.compiler_options import jit_with

# BatchNorm's epsilon in the MAE probe head (models/heads.ProbeHead).
STANDARDIZE_EPS = 1e-6
DEFAULT_L2_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FitInfo:
  """How a fit ended: `iterations` taken, the final `grad_norm` and `loss`, and `converged`
  (the gradient norm reached the tolerance before max_iter)."""
  iterations: int
  grad_norm: float
  loss: float
  converged: bool


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], 1 / sqrt(var + eps) [D]) of training features x [N, D] (float64 sums)."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  return mean.astype(np.float32), (1.0 / np.sqrt(x.var(axis=0) + STANDARDIZE_EPS)).astype(
      np.float32)


def _loss(params, x, y, l2):
  logits = x @ params["w"] + params["b"]
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return ce + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))


def _fit(params, x, y, l2, tol, *, max_iter: int):
  loss_fn = functools.partial(_loss, x=x, y=y, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry):
    params, state, i = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(params, updates), state, i + 1

  def keep_going(carry):
    _, state, i = carry
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (i == 0) | ((i < max_iter) & (grad_norm >= tol))

  params, state, iterations = jax.lax.while_loop(
      keep_going, step, (params, opt.init(params), jnp.zeros([], jnp.int32)))
  return params, iterations, otu.tree_norm(otu.tree_get(state, "grad")), loss_fn(params)


def _zeros_like_params(x: np.ndarray, num_classes: int) -> dict:
  return {"w": np.zeros((x.shape[-1], num_classes), np.float32),
          "b": np.zeros((num_classes,), np.float32)}


def fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, *, max_iter: int = 3000,
        tol: float = 1e-4, init: dict | None = None,
        compiler_options: Mapping[str, Any] | None = None) -> tuple[dict, FitInfo]:
  """Fits W [D, C], b [C] on standardised features x [N, D] and labels y int [N].

  Starts from zeros, or from `init` ({"w", "b"} of the same shapes: a warm start, e.g. the
  solution for a nearby L2 strength). With l2 > 0 the objective is strictly convex in W and
  in b up to a shift of every class's bias by the same constant (which leaves the softmax
  unchanged), so a fit that converges reaches the same predictions from any start; a fit
  stopped at `max_iter` ends where its start led it. Stops when the gradient's L2 norm falls
  below `tol` (converged) or after `max_iter` L-BFGS iterations. Deterministic for the same
  inputs, start and device. `compiler_options`: XLA options of the fit's program ({name:
  value}, a run's `training.compiler_options.of(config)`); None: XLA's defaults.
  """
  shapes = {"w": (x.shape[1], num_classes), "b": (num_classes,)}
  if init is None:
    init = _zeros_like_params(x, num_classes)
  got = {k: tuple(np.shape(init[k])) for k in shapes}
  if got != shapes:
    raise ValueError(f"init has shapes {got}; features [{x.shape[1]}] and {num_classes} "
                     f"classes need {shapes}")
  init = {k: jnp.asarray(init[k], jnp.float32) for k in shapes}
  fit_program = jit_with(_fit, compiler_options, static_argnames=("max_iter",))
  params, iterations, grad_norm, loss = fit_program(
      init, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), jnp.float32(l2),
      jnp.float32(tol), max_iter=int(max_iter))
  info = FitInfo(iterations=int(iterations), grad_norm=float(grad_norm), loss=float(loss),
                 converged=bool(float(grad_norm) < tol))
  return jax.device_get(params), info


def _fit_together(params, xs, y, l2, tol, *, max_iter: int):
  """_fit over a leading axis of params and xs: one while loop that runs until every set's
  own condition is false (vmap keeps a finished set's carry as it was)."""
  one = functools.partial(_fit, max_iter=max_iter)
  return jax.vmap(one, in_axes=(0, 0, None, None, None))(params, xs, y, l2, tol)


def fit_together(xs: np.ndarray | jax.Array, y: np.ndarray, num_classes: int, l2: float, *,
                 max_iter: int = 3000, tol: float = 1e-4, init: dict | None = None,
                 compiler_options: Mapping[str, Any] | None = None
                 ) -> tuple[list[dict], list[FitInfo]]:
  """`fit` of K feature sets xs [K, N, D] (numpy, or already on the device) with the same
  labels y int [N], as one vmapped program (module docstring: for GPUs). Each set's
  fit stops where its own `fit` would (a set that has converged is carried unchanged while the
  others iterate), so each result is that of `fit` on the set, up to the rounding of batched
  matmuls. `init`: {"w" [K, D, C], "b" [K, C]} or None (zeros). Returns the K parameter dicts
  and FitInfos, in order."""
  k, _, d = xs.shape
  if init is None:
    init = {name: np.stack([value] * k) for name, value in
            _zeros_like_params(xs[0], num_classes).items()}
  shapes = {"w": (k, d, num_classes), "b": (k, num_classes)}
  got = {name: tuple(np.shape(init[name])) for name in shapes}
  if got != shapes:
    raise ValueError(f"init has shapes {got}; {k} sets of [{d}] features and {num_classes} "
                     f"classes need {shapes}")
  program = jit_with(_fit_together, compiler_options, static_argnames=("max_iter",))
  params, iterations, grad_norm, loss = jax.device_get(program(
      {name: jnp.asarray(init[name], jnp.float32) for name in shapes},
      jnp.asarray(xs, jnp.float32), jnp.asarray(y, jnp.int32), jnp.float32(l2),
      jnp.float32(tol), max_iter=int(max_iter)))
  infos = [FitInfo(iterations=int(iterations[i]), grad_norm=float(grad_norm[i]),
                   loss=float(loss[i]), converged=bool(float(grad_norm[i]) < tol))
           for i in range(k)]
  # Copies: a kept Selection holds its own set's weights, not the whole stack.
  return [{name: np.array(params[name][i]) for name in shapes} for i in range(k)], infos


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
  """Top-1 accuracy of the fitted classifier on standardised features x [N, D]."""
  logits = np.asarray(x, np.float32) @ params["w"] + params["b"]
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(y)))


@dataclasses.dataclass(frozen=True)
class Selection:
  """What `select_l2` chose: the `l2` strength, the validation accuracy of every strength
  (`scores`), whether each strength's fit converged (`converged`) and the parameters fitted
  with the chosen one (`params`, a warm start for a refit)."""
  l2: float
  scores: dict[float, float]
  converged: dict[float, bool]
  params: dict


def select_l2(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              num_classes: int, grid: Sequence[float] = DEFAULT_L2_GRID,
              **fit_kwargs) -> Selection:
  """The L2 strength of `grid` with the best validation accuracy; ties go to the stronger
  penalty.

  x and x_val must be standardised with x's statistics. The strengths are fitted from the
  strongest to the weakest, each fit starting from the previous solution (a regularisation
  path, as glmnet walks it): fits that converge reach the optima of fits from zeros, in fewer
  iterations.
  """
  return select_l2_many([x], y, [x_val], y_val, num_classes, grid, **fit_kwargs)[0]


def sets_per_fit(rows: int, width: int, num_classes: int,
                 device: jax.Device | None = None) -> int:
  """How many feature sets of [rows, width] `fit_together` may take at once on `device`
  (default: the first local device): a quarter of its memory (2 GiB where it does not say)
  over one set's estimate: its features plus logits-sized temporaries (the logits, their
  gradient and the line search's trial points: 4 x [rows, num_classes]), float32."""
  device = device or jax.local_devices()[0]
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except (AttributeError, NotImplementedError, RuntimeError):  # backends without the stats
    limit = None
  budget = limit / 4 if limit else 2 * 2**30
  return max(1, int(budget // (4 * rows * (width + 4 * num_classes))))


def select_l2_many(xs: Sequence[np.ndarray] | np.ndarray, y: np.ndarray,
                   xs_val: Sequence[np.ndarray] | np.ndarray, y_val: np.ndarray,
                   num_classes: int, grid: Sequence[float] = DEFAULT_L2_GRID, *,
                   together: bool = False, sets_per_program: int | None = None,
                   names: Sequence[str] | None = None, **fit_kwargs) -> list[Selection]:
  """`select_l2` of each feature set xs[i] [N, D_i] (scored on xs_val[i] [M, D_i]), all with
  the labels y [N] and y_val [M]: one Selection per set, in order. xs and xs_val may be
  sequences of arrays or stacked arrays [K, N, D] / [K, M, D].

  together=False fits the sets one after another (`fit`). together=True (all D_i equal) fits
  groups of `sets_per_program` sets (default `sets_per_fit`: what fits in a quarter of the
  device's memory) as one program per strength (`fit_together`), each group's features moved
  to the device once; a GPU should run a group in about the time of one set (module
  docstring). `names` label the sets in the log.
  """
  count = len(xs)
  if not count or count != len(xs_val):
    raise ValueError(f"{count} training and {len(xs_val)} validation feature sets: need the "
                     "same positive number")
  labels = [f" ({n})" for n in names] if names is not None else [""] * count
  names = list(names) if names is not None else [f"set {i}" for i in range(count)]
  widths = [np.shape(x)[-1] for x in xs]
  for i in range(count):
    if np.shape(xs_val[i])[-1] != widths[i]:
      raise ValueError(f"feature set {names[i]!r}: {widths[i]} training features but "
                       f"{np.shape(xs_val[i])[-1]} validation features")
  if together and len(set(widths)) > 1:
    raise ValueError("sets fitted together need one feature width; got "
                     + ", ".join(f"{n}: {w}" for n, w in zip(names, widths)))
  group = 1
  if together:
    group = sets_per_program or sets_per_fit(len(y), widths[0], num_classes)
  scores = [{} for _ in range(count)]
  converged = [{} for _ in range(count)]
  fitted = [{} for _ in range(count)]
  for lo in range(0, count, group):
    members = range(lo, min(lo + group, count))
    if len(members) > 1:  # moved to the device once for every strength
      stacked = xs[lo:members[-1] + 1] if isinstance(xs, np.ndarray) else np.stack(
          [xs[i] for i in members])
      on_device = jnp.asarray(stacked, jnp.float32)
    inits: list[dict] | None = None
    for l2 in sorted(grid, reverse=True):
      start = time.perf_counter()
      if len(members) > 1:
        init = (None if inits is None else
                {k: np.stack([p[k] for p in inits]) for k in ("w", "b")})
        results = list(zip(*fit_together(on_device, y, num_classes, l2, init=init,
                                         **fit_kwargs)))
      else:
        results = [fit(xs[lo], y, num_classes, l2, init=None if inits is None else inits[0],
                       **fit_kwargs)]
      seconds = time.perf_counter() - start
      inits = [params for params, _ in results]
      for i, (params, info) in zip(members, results):
        scores[i][float(l2)] = accuracy(params, xs_val[i], y_val)
        fitted[i][float(l2)] = params
        converged[i][float(l2)] = info.converged
        # One line per fit: a probe over a grid on 60,000 examples takes minutes on a CPU.
        log.info("probe L2 %g%s: held-out top-1 %.4f, %d L-BFGS iterations (%s, |grad| "
                 "%.2e), %.0f s%s", l2, labels[i], scores[i][float(l2)], info.iterations,
                 "converged" if info.converged else "stopped at max_iter", info.grad_norm,
                 seconds, f" ({len(members)} sets together)" if len(members) > 1 else "")
  selections = []
  for i in range(count):
    best = max(scores[i], key=lambda l2, i=i: (scores[i][l2], l2))
    selections.append(Selection(l2=best, scores=scores[i], converged=converged[i],
                                params=fitted[i][best]))
  return selections
