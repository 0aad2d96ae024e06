"""Where a compiled step's time goes, without a UI: kernel time by category from a JAX trace.

  profile(run_step, compiled_text, steps, trace_dir) -> {"step_ms", "categories": {...},
                                                          "top_kernels": [...]}
  profile_torch(run_step, steps[, trace_path])  the same for a PyTorch peer (torch.profiler's
                                                self times; the trace written to trace_path)

`run_step()` runs one step to completion; it is called `steps` times under
`jax.profiler.trace(trace_dir)`. The trace's device events (XLA:CPU thunks, GPU kernels) are
mapped to the instructions of `compiled_text` (the compiled HLO, `compiled.as_text()`) by name
(CPU) or by their "hlo_op" stat (GPU), and each instruction to one category by what it
computes and where it comes from (its op_name metadata):

  attention         the fused attention kernel, or the attention core's dots / softmax
  matmul            the other dots and convolutions (projections, MLPs, patch embedding)
  norms/reductions  reductions and LayerNorm arithmetic
  scatter/gather    scatter, gather, dynamic (update-)slice
  copies/transposes copies, transposes, layout changes
  optimizer         the optimizer update (`jax.named_scope("optimizer")` in the train step)
  other             everything else (element-wise work, the loss, diagnostics)

Times are per step (total over the traced steps / steps); on CPU, thunks of independent
instructions can run on several threads at once, so the categories may add up to more than
the step's wall time; with several devices (GPUs, or CPU devices of `--cpu_devices`) the
times are summed over them, the work of the whole step.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from typing import Callable

import jax

CATEGORIES = ("attention", "matmul", "norms/reductions", "scatter/gather", "copies/transposes",
              "optimizer", "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _parse(hlo: str) -> tuple[dict, dict]:
  """(instructions: name -> (opcode, line), computations: name -> [instruction names])."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      instrs[m.group(1)] = (m.group(2), line)
      comps[current].append(m.group(1))
  return instrs, comps


def _ops_inside(name: str, instrs: dict, comps: dict, depth: int = 0) -> set[str]:
  """Opcodes of an instruction and of the computations it calls (fusions), recursively."""
  opcode, line = instrs.get(name, ("", ""))
  ops = {opcode}
  if opcode == "custom-call":
    target = _TARGET.search(line)
    ops.add("custom-call:" + (target.group(1) if target else ""))
  if depth < 4:
    for called in _CALLS.findall(line):
      for inner in comps.get(called, ()):
        ops |= _ops_inside(inner, instrs, comps, depth + 1)
  return ops


def categorize(name: str, instrs: dict, comps: dict) -> tuple[str, str]:
  """(category, op_name) of instruction `name`."""
  ops = _ops_inside(name, instrs, comps)
  op_name = ""
  for inner in [name] + [i for c in _CALLS.findall(instrs.get(name, ("", ""))[1])
                         for i in comps.get(c, ())]:
    m = _OP_NAME.search(instrs.get(inner, ("", ""))[1])
    if m:
      op_name = m.group(1)
      break
  path = op_name.lower()
  if any(o.startswith("custom-call:") and ("fmha" in o or "attention" in o or "flash" in o)
         for o in ops):
    return "attention", op_name
  if "/optimizer/" in path or path.endswith("/optimizer"):
    return "optimizer", op_name
  in_attention_core = "/attn/" in path and not re.search(r"/attn/(qkv|proj)\b", path)
  if ops & {"dot", "convolution"} or any("gemm" in o or "matmul" in o for o in ops):
    return ("attention" if in_attention_core else "matmul"), op_name
  if in_attention_core:
    return "attention", op_name
  if ops & {"scatter", "gather", "dynamic-slice", "dynamic-update-slice"}:
    return "scatter/gather", op_name
  if ops & {"reduce", "reduce-window"} or re.search(r"/(norm\w*|layernorm)\b", path):
    return "norms/reductions", op_name
  if ops & {"copy", "transpose", "copy-start", "copy-done"}:
    return "copies/transposes", op_name
  return "other", op_name


# PyTorch operators -> the same categories, for the peers' profiles (`profile_torch`).
_TORCH_CATEGORIES = (
    ("attention", re.compile(r"scaled_dot_product|flash_attention|efficient_attention|_attention")),
    ("optimizer", re.compile(r"^Optimizer\.|_foreach_|adam|lerp")),
    ("matmul", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|mkldnn_convolution|"
                          r"convolution_backward|_convolution)$")),
    ("norms/reductions", re.compile(r"layer_norm|^aten::(sum|mean|var|var_mean|std|norm|amax)$")),
    ("scatter/gather", re.compile(r"gather|scatter|index_select|^aten::index")),
    ("copies/transposes", re.compile(r"^aten::(copy_|contiguous|clone|_to_copy|cat)$")),
)


def torch_category(op: str) -> str:
  """The category of a PyTorch operator name (e.g. "aten::addmm")."""
  for category, pattern in _TORCH_CATEGORIES:
    if pattern.search(op):
      return category
  return "other"


def profile_torch(run_step: Callable[[], None], steps: int, top: int = 15,
                  trace_path: str = "") -> dict:
  """`profile` for a PyTorch step: self time per operator from torch.profiler (CPU time on a
  CPU, CUDA kernel time on a GPU), in the same categories, per step; with `trace_path`, the
  trace is also written there (Chrome trace JSON: chrome://tracing, Perfetto)."""
  import torch
  from torch.autograd import DeviceType
  from torch.profiler import ProfilerActivity
  cuda = torch.cuda.is_available()
  activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
  with torch.profiler.profile(activities=activities) as prof:
    for _ in range(steps):
      run_step()
  if trace_path:
    os.makedirs(os.path.dirname(trace_path) or ".", exist_ok=True)
    prof.export_chrome_trace(trace_path)
  rows = []
  for event in prof.key_averages():
    # On a GPU the kernels appear twice: as their own CUDA rows and as the device time of the
    # operator that launched them; the operator rows are kept (their names categorise).
    if cuda and event.device_type != DeviceType.CPU:
      continue
    # Self time only: an operator's children are counted under their own names.
    us = event.self_device_time_total if cuda else event.self_cpu_time_total
    if us <= 0 or event.key.startswith(("ProfilerStep", "autograd::engine")):
      continue
    rows.append({"kernel": event.key, "ms": us / 1e3 / steps,
                 "category": torch_category(event.key), "calls": event.count // steps})
  return _summary(rows, steps, top)


def _event_instruction(event) -> str:
  for key, value in getattr(event, "stats", ()):
    if key == "hlo_op":
      return str(value)
  return event.name


def profile(run_step: Callable[[], None], compiled_text: str, steps: int, trace_dir: str,
            top: int = 15) -> dict:
  """Traces `steps` calls of `run_step` and returns the per-step kernel time by category."""
  instrs, comps = _parse(compiled_text)
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      run_step()
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  data = jax.profiler.ProfileData.from_file(files[-1])
  per_instr = collections.Counter()
  for plane in data.planes:
    device = plane.name.startswith("/device:")
    if not device and not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      # GPU: kernels on the device's streams. CPU: XLA's thunks run on the Eigen threads, or
      # on the calling thread when small or when the pool is busy; any line's events count
      # whose name is an instruction of the compiled step.
      for event in line.events:
        name = _event_instruction(event)
        if name in instrs:
          per_instr[name] += event.duration_ns
  rows = []
  for name, ns in per_instr.items():
    category, op_name = categorize(name, instrs, comps)
    rows.append({"kernel": name, "ms": ns / 1e6 / steps, "category": category,
                 "op_name": op_name[-120:]})
  return _summary(rows, steps, top)


def _summary(rows: list[dict], steps: int, top: int) -> dict:
  """Per-step totals by category and the `top` kernels of `rows` (each with "ms" per step and
  "category"), as `profile` and `profile_torch` return them."""
  categories = dict.fromkeys(CATEGORIES, 0.0)
  for row in rows:
    categories[row["category"]] += row["ms"]
  rows = sorted(({**r, "ms": round(r["ms"], 3)} for r in rows), key=lambda r: -r["ms"])
  return {"steps": steps, "kernel_ms_per_step": round(sum(categories.values()), 3),
          "categories": {k: round(v, 3) for k, v in categories.items()},
          "top_kernels": rows[:top]}
