r"""Per-device memory of a training step for a config and a mesh, without the hardware.

  python -m mim_jax.memory_plan --config=configs/mae_vith.py --mesh=fsdp:8 --batch=4096 \
      [--rules=fsdp] [--hbm_gib=80] [--config.model.dtype=bfloat16] [--config.model.remat=full]

The train step of `mim_jax.training.setup` (the same function, optimizer and shardings a run
uses) is lowered and compiled for the mesh on simulated CPU devices, from abstract shapes only:
no parameter or batch is ever allocated, and the dataset is not read (the step is planned on
synthetic images of the config's size and channels; only data.device_resident's split is read,
to count its copy). It prints, per device:

  params / opt_state / extra   bytes of the state shards each device holds (from the shardings)
  batch                        bytes of the device's slice of the input batch
  xla arguments / outputs      XLA's compiled memory analysis (outputs alias the donated state)
  xla temp                     XLA's temporary buffers: activations kept for the backward pass,
                               gradients, collectives' buffers
  training split               data.device_resident's copy of the split (read from the data)
  peak estimate                arguments + outputs - aliased + temp (+ the training split)

`--mesh` is AXIS:SIZE[,AXIS:SIZE] (replaces config.mesh; the simulated device count is the
product); `--batch` the global batch (config.global_batch_size); `--rules=fsdp` uses
`config_defaults.fsdp_rules()`, `--rules=replicate` pure replication, and the default keeps
the config's rules. Compiling for N devices costs about as much as compiling one device's
program, so only the per-device batch (batch / (data x fsdp)) drives the compile time.

The numbers are XLA:CPU's, compiled with its memory-minimising scheduler (SCHEDULER_FLAG;
with the default concurrency-optimised one, activation checkpointing shows no saving); the
command leaves config.compiler_options out (`plan()` takes the config as given, except that
`nonfinite_guard=""` plans the accelerators' "select", not the CPU's "cond"). GPU and TPU
compilers fuse, lay out and schedule differently (and CPU may keep bfloat16 matmul results
in float32), so read them as an estimate of the same order, not a guarantee; leave headroom
(docs/scaling.md).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from mim_jax.config.errors import ConfigError, config_error, refuse_extra_arguments
from mim_jax.training.run_errors import EXIT_BAD_INPUT

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS,
                 argv: Sequence[str] | None = None) -> None:
  """The command's flags, defined when it runs (importing the module, e.g. next to
  mim_jax.main in one process, defines none)."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                  lock_config=True, flag_values=flag_values,
                                  sys_argv=None if argv is None else list(argv))
  flags.DEFINE_string("mesh", "", "AXIS:SIZE[,AXIS:SIZE...], e.g. fsdp:8 or data:2,fsdp:4 "
                      "(empty: config.mesh on --devices devices).", flag_values=flag_values)
  flags.DEFINE_integer("devices", 0, "Simulated devices for a mesh with a -1 axis (the config's "
                       "default data:-1 among them); otherwise the mesh's product.",
                       flag_values=flag_values)
  flags.DEFINE_integer("batch", 0, "Global batch size (0: config.global_batch_size).",
                       flag_values=flag_values)
  flags.DEFINE_enum("rules", "config", ["config", "fsdp", "replicate"],
                    "Sharding rules: the config's, config_defaults.fsdp_rules(), or replicate.",
                    flag_values=flag_values)
  flags.DEFINE_float("hbm_gib", 0.0, "Device memory in GiB: also say whether the step fits.",
                     flag_values=flag_values)
  flags.DEFINE_bool("json", False, "Also print the numbers as one JSON line.",
                    flag_values=flag_values)


SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def parse_mesh(text: str) -> list[tuple[str, int]]:
  """"data:2,fsdp:4" -> [("data", 2), ("fsdp", 4)]; ConfigError naming --mesh for text of
  another form (the sizes are checked with the config's mesh, in `num_devices`)."""
  out = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    name, sep, size = item.partition(":")
    if not sep or not name or not size.lstrip("-").isdigit():
      raise config_error("--mesh", text, "AXIS:SIZE[,AXIS:SIZE...] with positive sizes (or -1 "
                         "for one axis: the remaining devices), e.g. fsdp:8 or data:2,fsdp:4")
    out.append((name, int(size)))
  return out


def plan(config, devices=None) -> dict[str, Any]:
  """Compiles `config`'s train step for `config.mesh` on `devices` (default: all) from
  abstract inputs and returns the per-device byte counts (see the module docstring)."""
  import jax

  from mim_jax.training import parallel, setup
  if not config.get("nonfinite_guard", ""):
    # The step a GPU or TPU run compiles: its default guard, not the CPU's that compiles this
    # plan ("cond" on a CPU needs less temporary memory, docs/benchmarks.md).
    config = config.copy_and_resolve_references()
    config.nonfinite_guard = "select"
  # The schedule's length does not change the memory: a nominal 1000 steps per epoch.
  r = setup.setup_run(setup.prepare(config), devices=devices,
                      num_examples=1000 * config.global_batch_size, process_count=1)
  abstract_state, shardings, mesh = r.abstract_state, r.state_shardings, r.mesh
  abstract_batch = setup.abstract_batch(r, config.global_batch_size)
  step = r.jit_step()
  t0 = time.perf_counter()
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  lowered = step.lower(abstract_state, abstract_batch, rng)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  part = lambda name: parallel.per_device_bytes(getattr(shardings, name),
                                                getattr(abstract_state, name))
  per_device_batch = config.global_batch_size // parallel.batch_parallelism(mesh)
  batch_bytes = sum(math.prod(x.shape[1:]) * x.dtype.itemsize * per_device_batch
                    for x in abstract_batch.values())
  out = {
      "mesh": dict(mesh.shape), "devices": mesh.devices.size,
      "global_batch": config.global_batch_size, "per_device_batch": per_device_batch,
      "grad_accum_steps": config.grad_accum_steps, "dtype": config.model.dtype,
      "remat": config.model.get("remat", "none"), "nonfinite_guard": config.nonfinite_guard,
      "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)),
      "params": part("params"), "opt_state": part("opt_state"), "extra": part("extra"),
      "batch": batch_bytes,
      "xla_arguments": stats.argument_size_in_bytes, "xla_outputs": stats.output_size_in_bytes,
      "xla_aliased": stats.alias_size_in_bytes, "xla_temp": stats.temp_size_in_bytes,
      "compile_s": compile_s,
  }
  out["peak"] = (out["xla_arguments"] + out["xla_outputs"] - out["xla_aliased"]
                 + out["xla_temp"])
  if config.data.get("device_resident", False):
    # The split's copy lives on the device beside the step (read from the data: its length
    # and one decoded image), outside the compiled program's arguments.
    from mim_jax.data import device_resident
    out["resident_split"] = device_resident.split_bytes(  # r.config: its paths expanded
        r.config.data, image_size=tuple(config.image_size), channels=config.channels)
    out["peak"] += out["resident_split"]
  return out


def format_plan(result: dict[str, Any], hbm_gib: float = 0.0) -> str:
  gib = lambda b: f"{b / 2**30:8.2f} GiB"
  lines = [
      f"mesh {result['mesh']} ({result['devices']} devices), global batch "
      f"{result['global_batch']} = {result['per_device_batch']} per device, grad_accum "
      f"{result['grad_accum_steps']}, dtype {result['dtype']}, remat {result['remat']}, "
      f"non-finite guard {result['nonfinite_guard']}, "
      f"{result['num_params'] / 1e6:.1f}M params (compiled in {result['compile_s']:.0f} s)",
      f"  params          {gib(result['params'])}",
      f"  opt_state       {gib(result['opt_state'])}",
      f"  extra           {gib(result['extra'])}",
      f"  batch           {gib(result['batch'])}",
      f"  xla arguments   {gib(result['xla_arguments'])}",
      f"  xla outputs     {gib(result['xla_outputs'])} ({gib(result['xla_aliased']).strip()} "
      "aliased to the donated state)",
      f"  xla temp        {gib(result['xla_temp'])}",
  ]
  if "resident_split" in result:
    from mim_jax.data import device_resident
    over = result["resident_split"] > device_resident.MAX_BYTES
    lines.append(f"  training split  {gib(result['resident_split'])} (data.device_resident: "
                 "a copy on every device" + (f"; a run refuses more than "
                 f"{device_resident.MAX_BYTES / 2**30:.0f} GiB)" if over else ")"))
  lines.append(f"  peak estimate   {gib(result['peak'])}")
  if hbm_gib:
    fits = result["peak"] <= hbm_gib * 2**30
    lines.append(f"  fits in {hbm_gib:g} GiB: {'yes' if fits else 'NO'} "
                 f"({100 * result['peak'] / (hbm_gib * 2**30):.0f}%)")
  return "\n".join(lines)


def num_devices(mesh_cfg, devices_flag: int, mesh_source: str, written=None) -> int:
  """The simulated device count: the mesh's product, or --devices where the mesh has a -1
  axis (or none). ConfigError for sizes that are no mesh, or a count the mesh contradicts or
  cannot take; `mesh_source` names where the mesh came from ("--mesh", or the config's field
  "mesh"), `written` the value as given there (default: `mesh_cfg`)."""
  written = mesh_cfg if written is None else written
  sizes = [int(s) for _, s in mesh_cfg]
  if any(s == 0 or s < -1 for s in sizes):
    raise config_error(mesh_source, written, "axis sizes that are positive counts, or -1 for "
                       "one axis (the remaining devices)")
  if sizes.count(-1) > 1:
    raise config_error(mesh_source, written, "at most one axis of size -1")
  fixed = math.prod(s for s in sizes if s != -1)
  shown = mesh_source if mesh_source.startswith("--") else f"config.{mesh_source}"
  if devices_flag < 0:
    raise config_error("--devices", devices_flag, "a device count >= 0 (0: the mesh's product)")
  if -1 not in sizes and sizes:
    if devices_flag and devices_flag != fixed:
      raise config_error("--devices", devices_flag, f"{fixed}, the product of {shown}'s "
                         "sizes, or left out: it counts the devices only for a mesh with a -1 "
                         "axis")
    return fixed
  if not devices_flag:
    raise config_error(mesh_source, written, "sizes that multiply to a device count: it has a "
                       "-1 axis (the remaining devices) and no simulated machine to fill it; give "
                       "--devices=N, or --mesh=AXIS:SIZE[,...] with every size")
  if devices_flag % fixed:
    raise config_error("--devices", devices_flag, f"a multiple of {fixed}, the product of "
                       f"{shown}'s other axes")
  return devices_flag


def refuse_unplanned_overrides(config, overridden) -> None:
  """ConfigError for a `--config.FIELD` the plan does not read (config.step_fields): the
  training loop's settings, and the input's: the plan compiles the step on synthetic images of
  the config's size, so only the fields the step reads act, and a classifier's class count;
  with data.device_resident the data fields act too (the split's copy is counted, read from
  the data), all but the host pipeline's workers and buffers. `overridden`: {dotted field:
  value} of the command line."""
  from mim_jax.config import step_fields
  resident = bool(config.data.get("device_resident", False))
  data, loop = step_fields.unread_by_step(config, overridden, reads_data=resident)
  for fields, why in ((data, "the plan compiles the train step on synthetic images of the "
                       "config's size (the data is read only for a data.device_resident "
                       "split)" if not resident else "the plan compiles the train step, and "
                       "the host pipeline's workers and buffers are not part of it"),
                      (loop, "the plan compiles the train step, not the training loop around "
                       "it (monitoring, checkpoints, exports, the run's length)"),
                      (step_fields.values_only(overridden),
                       "a step compiled with other values of the lr schedule, Adam's constants "
                       "or the seed holds the same arrays")):
    if fields:
      raise ConfigError(f"{', '.join(f'config.{f}={overridden[f]!r}' for f in fields)} "
                        f"would not change the plan: {why}. Drop the flag.")


def main(argv) -> None:
  refuse_extra_arguments(argv)
  try:
    _plan_from_flags()
  except ConfigError as e:  # bad input: one line and exit 2, as the trainer reports it
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _plan_from_flags() -> None:
  config, n = checked_config()
  # XLA:CPU's default scheduler favours concurrency and keeps recomputed (remat) activations
  # alive as long as stored ones; the memory-minimising scheduler is closer to what GPU and
  # TPU compilers do under a memory limit. Read when JAX starts its backend, i.e. below.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " " + SCHEDULER_FLAG).strip()
  import jax
  # Simulated CPU devices; possible only before JAX starts its backends (nothing above has).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)
  if jax.device_count() != n:
    sys.exit(f"error: asked for {n} simulated devices, JAX has {jax.device_count()}")
  result = plan(config)
  print(format_plan(result, FLAGS.hbm_gib))
  if FLAGS.json:
    import json
    print("json:", json.dumps(result))


def checked_config():
  """(the config to plan, the simulated device count) of the parsed command line (FLAGS), after
  every check a run makes before it starts; starts no JAX backend. ConfigError names what is
  wrong."""
  from mim_jax import registry
  from mim_jax.config import defaults as config_defaults
  from mim_jax.config import files
  files.require_loaded(FLAGS)
  config = FLAGS.config
  if FLAGS.batch < 0:
    raise config_error("--batch", FLAGS.batch, "a global batch size >= 0 (0: the config's)")
  if FLAGS.hbm_gib < 0:
    raise config_error("--hbm_gib", FLAGS.hbm_gib, "device memory in GiB >= 0 (0: no fit check)")
  if registry.method_class(config.method).kind == "job":
    raise config_error("method", config.method, "a method with a train step (frozen-feature "
                       "jobs such as knn and probe train nothing to plan)")
  overrides = config_flags.get_override_values(FLAGS["config"])
  from mim_jax.training import setup
  files.refuse_flags_beside_fields(FLAGS, overrides, {
      "mesh": "mesh", "batch": "global_batch_size", "rules": "sharding_rules"})
  setup.refuse_inert_overrides(config, files.load_config_file(FLAGS["config"].config_filename),
                               overrides, loads_weights=False)
  refuse_unplanned_overrides(config, overrides)
  with config.unlocked():
    if FLAGS.mesh:
      config.mesh = parse_mesh(FLAGS.mesh)
    if FLAGS.batch:
      config.global_batch_size = FLAGS.batch
    if FLAGS.rules == "fsdp":
      axis = "fsdp" if any(a == "fsdp" for a, _ in config.mesh) else config.mesh[-1][0]
      config.sharding_rules = config_defaults.fsdp_rules(axis)
    elif FLAGS.rules == "replicate":
      config.sharding_rules = [(".*", ())]
    if config.get("compiler_options"):
      # The run's options are for its own backend. XLA:CPU stands in for that backend here:
      # options it acts on (e.g. :runlocal's optimisation level 0) would change the program
      # planned, and ones it does not know would fail the compile.
      print(f"config.compiler_options={config.compiler_options!r} not applied: the plan is "
            "compiled by XLA:CPU", file=sys.stderr)
      config.compiler_options = ""
  n = (num_devices(config.mesh, FLAGS.devices, "--mesh", FLAGS.mesh) if FLAGS.mesh
       else num_devices(config.mesh, FLAGS.devices, "mesh"))
  if not config.data.get("device_resident", False):
    # The plan is of the step, from shapes: the data need not be on this machine (an ImageNet
    # run planned on a laptop). A device-resident split is counted from the data itself.
    config = setup.on_synthetic_data(config, "the memory plan")
  # The static checks a run makes before it starts (an evaluation's encoder adopted from its
  # export first), before JAX starts and the compile; the batch against the mesh follows in
  # plan() (setup_run).
  return setup.prepare(config), n


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  define_flags()
  flags.mark_flags_as_required(["config"])
  from mim_jax import main as trainer  # its parser: unknown --config fields named, no traceback
  app.run(main, flags_parser=trainer.parse_flags)
