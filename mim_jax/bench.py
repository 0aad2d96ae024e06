r"""Training-step throughput of pre-training configs, side by side with HF PyTorch ViTMAE.

  python -m mim_jax.bench --config=configs/mae_fmnist.py [--steps=20] [--peer=hf]
  python -m mim_jax.bench --config=configs/mae_fmnist.py --also=configs/simmim_fmnist.py \
      --peer=none [--batch=256]

The mim_jax train step of `--config` (and of every `--also` config, e.g. another method on the
same encoder) runs on one synthetic batch (`--batch`, default config.global_batch_size), after
warm-up steps, each step timed to completion (block_until_ready). With `--peer=hf` (MAE configs)
HF's ViTMAEForPreTraining trains the same architecture (encoder/decoder sizes, patch, image
size, channels, mask ratio, norm-pix loss) with AdamW on the same batch size, timed to the
loss's .item(). Prints one JSON line per measurement. (No FLOPs/MFU yet.)
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a pre-training config file.",
                                lock_config=True)
flags.DEFINE_multi_string("also", [], "Further config files (PATH[:ARG]) timed in the same run.")
flags.DEFINE_integer("batch", 0, "Global batch for every measurement (0: each config's own).")
flags.DEFINE_integer("steps", 20, "Timed steps per implementation.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
flags.DEFINE_enum("peer", "hf", ["hf", "none"], "Peer implementation timed in the same run.")
flags.mark_flags_as_required(["config"])


def _summary(name: str, times: list[float], config, **extra) -> dict:
  median = statistics.median(times)
  from mim_jax.models.vit import describe_size
  return {"impl": name, "method": config.method, "model": describe_size(config.model),
          "image_size": list(config.image_size), "masking": config.masking.kind,
          "mask_ratio": config.masking.ratio,
          "global_batch": config.global_batch_size, "steps": len(times),
          "step_s_median": round(median, 5), "step_s_min": round(min(times), 5),
          "step_s_max": round(max(times), 5),
          "images_per_s": round(config.global_batch_size / median, 1), **extra}


def bench_mim_jax(config, steps: int, warmup: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import numpy as np

  from mim_jax import masking, optim, train
  from mim_jax.methods import build_method

  method = build_method(config)
  schedule = optax.constant_schedule(1e-4)
  tx = optim.build_optimizer(config.optimizer, schedule)
  shape = (config.global_batch_size, *config.image_size, config.channels)
  state = jax.jit(train.init_train_state, static_argnums=(0, 1, 3))(
      method, tx, jax.random.key(0), (1, *shape[1:]))
  step = jax.jit(train.make_train_step(method, tx, schedule), donate_argnums=(0,))
  batch = {"image": jax.random.normal(jax.random.key(1), shape),
           "label": jnp.zeros(shape[0], jnp.int32)}
  generator = getattr(method, "mask_generator", None)
  if generator is not None and generator.on_host:  # drawn by the input pipeline in training
    batch[masking.TOKEN_MASK_KEY] = jnp.asarray(generator.host(np.random.default_rng(0),
                                                                shape[0]))
  rng = jax.random.key(2)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - start)
  device = jax.devices()[0]
  params = sum(int(x.size) for x in jax.tree.leaves(state.params))
  return _summary("mim_jax", times, config, params=params, device=device.device_kind,
                  device_count=jax.device_count(), dtype=config.model.dtype,
                  versions={"jax": jax.__version__})


def bench_hf(config, steps: int, warmup: int) -> dict:
  import torch
  import transformers

  from mim_jax.models.vit import size_from_config

  size, patch = size_from_config(config.model)
  if config.image_size[0] != config.image_size[1]:
    raise ValueError("HF ViTMAE needs square images")
  hf_config = transformers.ViTMAEConfig(
      image_size=config.image_size[0], patch_size=patch, num_channels=config.channels,
      hidden_size=size.width, num_hidden_layers=size.depth, num_attention_heads=size.num_heads,
      intermediate_size=size.mlp_dim, decoder_hidden_size=config.decoder.width,
      decoder_num_hidden_layers=config.decoder.depth,
      decoder_num_attention_heads=config.decoder.num_heads,
      decoder_intermediate_size=4 * config.decoder.width, mask_ratio=config.masking.ratio,
      norm_pix_loss=bool(config.target.norm_pix), layer_norm_eps=1e-6)
  model = transformers.ViTMAEForPreTraining(hf_config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(config.optimizer.b1,
                                                             config.optimizer.b2),
                          weight_decay=config.optimizer.weight_decay)
  images = torch.randn(config.global_batch_size, config.channels, *config.image_size)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = model(pixel_values=images).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss.item()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  # Trainable only: HF keeps the fixed sin-cos tables as frozen parameters.
  params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return _summary("hf_transformers_pytorch", times, config, params=params, device="cpu",
                  threads=torch.get_num_threads(), dtype="float32",
                  versions={"torch": torch.__version__, "transformers": transformers.__version__})


def load_config(spec: str):
  """A config from "PATH[:ARG]", as --config=PATH:ARG loads it."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def with_batch(config, batch: int):
  if batch:
    config = config.copy_and_resolve_references()
    config.global_batch_size = batch
  return config


def main(argv):
  del argv
  from mim_jax.config_validation import PRETRAINING_METHODS
  configs = [with_batch(c, FLAGS.batch) for c in [FLAGS.config, *map(load_config, FLAGS.also)]]
  for c in configs:
    if c.method not in PRETRAINING_METHODS:
      raise app.UsageError(f"config.method={c.method!r}: the benchmark times pre-training "
                           f"methods {PRETRAINING_METHODS}")
  for c in configs:
    print(json.dumps(bench_mim_jax(c, FLAGS.steps, FLAGS.warmup)), flush=True)
  if FLAGS.peer == "hf":
    if configs[0].method != "mae":
      raise app.UsageError("--peer=hf times HF ViTMAE: the first config must be an MAE config")
    print(json.dumps(bench_hf(configs[0], FLAGS.steps, FLAGS.warmup)), flush=True)


if __name__ == "__main__":
  app.run(main)
