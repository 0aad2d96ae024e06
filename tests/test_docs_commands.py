"""Every `python -m mim_jax.main` command that README.md and docs/*.md show still runs today as
far as the trainer's start-up checks go: known flags and fields, values of their types, nothing
the run would not read, every static check of the method. A renamed field or a refused setting
in a documented command fails here, not for the reader who pastes it. The same for the
benchmark's and the memory planner's commands (`python -m mim_jax.bench`, `mim_jax.memory_plan`):
every check they make before JAX starts, i.e. up to the timing or the compile.

The docs name data that is not on this machine (ImageNet under /data, TFDS folders): the
checks that read the data's files are left out, every other check runs. Weights they name (a
results folder R, imported checkpoints) are not here either: a complaint about such a path,
when nothing is there, is answered by a stand-in of the same shape (freshly initialised
weights of the command's encoder size, a random tokenizer), and the checks run again with it:
the checks after the one that opens the path (a probe's classifier fields, say) still run.
Commands with shell variables, `<...>` or `...`, or a value written as a placeholder
(`--config.seed=N`) are left out.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shlex
import subprocess

import pytest
from absl import flags
from ml_collections import config_flags

from mim_jax import main, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config import files, validation
from mim_jax.config.errors import ConfigError
from mim_jax.data import validation as data_validation
from mim_jax.training import setup

from conftest import tool_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Fields naming weights a documented command may point to without them being here.
PATH_FIELDS = ("init_from", "tokenizer.path", "teacher.path", "target.tokenizer.path",
               "target.teacher.path")
SHELL_OPERATORS = ("&&", "||", ";", "|", "&")


def code_lines(text: str) -> list[str]:
  """The lines of the fenced code blocks and the inline code spans of a markdown text, with
  backslash continuations joined and, in code blocks, comments after ` #` dropped."""
  text = re.sub(r"\\\n\s*", " ", text)
  lines = []
  for i, part in enumerate(text.split("```")):
    if i % 2:  # inside a fenced block
      lines += [line.split(" #")[0] for line in part.splitlines()]
    else:  # prose: inline spans, which may wrap across lines
      lines += [" ".join(span.split()) for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`",
                                                              part)]
  return lines


def documented_commands(tool: str = "main") -> list[tuple[str, list[str]]]:
  """(where, the arguments after `python -m mim_jax.<tool>`) of every checkable command."""
  found = []
  for doc in DOCS:
    for line in code_lines(doc.read_text()):
      for match in re.finditer(rf"python3? -m mim_jax\.{tool}\b(.*)", line):
        rest = match.group(1)
        if "$" in rest or "<" in rest or "..." in rest:
          continue
        args = []
        for token in shlex.split(rest):
          if token in SHELL_OPERATORS or token.startswith((">", "2>")):
            break
          args.append(token)
        placeholder = any(re.fullmatch(r"--config\.[\w.]+=[A-Z][A-Z_]*", a) for a in args)
        if placeholder or not any(a.startswith("--config=") for a in args):
          continue
        found.append((f"{doc.name}: {' '.join(args)[:90]}", args))
  return found


COMMANDS = documented_commands()
BENCH_COMMANDS = documented_commands("bench")
PLAN_COMMANDS = documented_commands("memory_plan")


def test_the_docs_show_commands_to_check():
  """The extraction finds the docs' commands (a change of markup would silently skip them)."""
  where = {w.split(":")[0] for w, _ in COMMANDS}
  assert {"README.md", "results.md", "weights.md", "scaling.md"} <= where, where
  assert len(COMMANDS) >= 50, len(COMMANDS)
  assert len(BENCH_COMMANDS) >= 25 and len(PLAN_COMMANDS) >= 15, (len(BENCH_COMMANDS),
                                                                   len(PLAN_COMMANDS))


def _missing_path(err: Exception) -> str | None:
  """The field of PATH_FIELDS that the complaint `err` is about, when its path is not on this
  machine (a complaint about a path that is here, or about '' or 'random', is a real one)."""
  match = re.match(r"config\.([\w.]+)='([^']*)'", str(err))
  if match and match.group(1) in PATH_FIELDS and match.group(2) not in ("", "random") and (
      not os.path.exists(os.path.expanduser(match.group(2)))):
    return match.group(1)
  return None


_STAND_INS: dict = {}


def _stand_in(field: str, config, root: pathlib.Path) -> str:
  """Weights of the shape the command's `field` asks for, made once per shape under `root`:
  an MAE export of the config's encoder size and images, or a random tokenizer for BEiT."""
  from conftest import export_fresh_encoder, export_random_tokenizer
  size = tuple(config.model.get(k, 0) for k in ("variant", "width", "depth", "num_heads",
                                                "mlp_dim"))
  key = (field.endswith("tokenizer.path"), tuple(config.image_size), config.channels, size,
         tuple(config.data.mean), tuple(config.data.std))
  if key not in _STAND_INS:
    directory = str(root / f"stand_in_{len(_STAND_INS)}")
    _STAND_INS[key] = (export_random_tokenizer(config, directory) if key[0]
                       else export_fresh_encoder(config, directory))
  return _STAND_INS[key]


@pytest.fixture(name="without_data_files")
def _without_data_files(monkeypatch):
  """The data's files (folders, IDX / .npy files, prepared TFDS datasets) are not on this
  machine: their checks are stubbed, every other check runs."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(data_validation, "_validate_source", lambda *a, **k: None)
  monkeypatch.setattr(data_validation, "_validate_eval_source", lambda *a, **k: None)
  monkeypatch.setattr(data_validation, "_validate_scored_labels", lambda *a, **k: None)


@pytest.mark.parametrize("args", [a for _, a in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_documented_command_passes_the_start_up_checks(args, without_data_files,
                                                       tmp_path_factory):
  _check_trainer_command(args, tmp_path_factory.getbasetemp())


def _check_trainer_command(args: list[str], stand_ins: pathlib.Path) -> None:
  """The start-up checks of `python -m mim_jax.main ARGS` (data files stubbed by the caller);
  a weights path that is not on this machine is replaced by a stand-in under `stand_ins` and
  the checks run again."""
  flag_values = flags.FlagValues()
  argv = ["mim_jax.main", *args]
  main.define_flags(flag_values, argv)
  flag_values(argv)  # unknown flags and fields, values that do not parse
  config = flag_values.config
  file_config = files.load_config_file(flag_values["config"].config_filename)
  overrides = config_flags.get_override_values(flag_values["config"])
  # As main.py checks a command line: the file, then the overrides against it. The unread
  # checks first, on their own: they open no path, so a missing one cannot hide them.
  registry.check_unread_fields(file_config)
  validation.check_unread(config, file_config,
                          registry.method_class(config.method).unread_rules(),
                          reference="config file's value")
  setup.refuse_inert_overrides(config, file_config, overrides, loads_weights=False)
  for _ in range(len(PATH_FIELDS) + 1):
    try:
      registry.validate_config(config, file_config)
      return
    except ConfigError as err:
      field = _missing_path(err)
      if field is None:
        raise
      config_defaults.override(config, **{field: _stand_in(field, config, stand_ins)})
  raise AssertionError("the stand-ins did not satisfy the path checks")


def _check_bench_command(args: list[str], monkeypatch) -> None:
  from absl import app

  from mim_jax import bench
  tool_flags(bench, args, monkeypatch)
  try:
    command = bench.checked_command()
  except app.UsageError as err:
    if _missing_path(err) is None:
      raise
    return
  assert command.configs and command.rows


@pytest.mark.parametrize("args", [a for _, a in BENCH_COMMANDS],
                         ids=[w for w, _ in BENCH_COMMANDS])
def test_documented_bench_command_reaches_its_timing(args, without_data_files, monkeypatch):
  """Every check of `python -m mim_jax.bench` before JAX starts: the mode's flags, the
  overrides each row reads, the peer against the config, each row's static checks."""
  _check_bench_command(args, monkeypatch)


@pytest.mark.parametrize("args", [a for _, a in PLAN_COMMANDS], ids=[w for w, _ in PLAN_COMMANDS])
def test_documented_memory_plan_command_reaches_its_compile(args, without_data_files,
                                                            monkeypatch):
  """Every check of `python -m mim_jax.memory_plan` before its compile: its flags beside the
  fields they replace, the overrides the plan reads, the mesh against the devices, the run's
  static checks."""
  from mim_jax import memory_plan
  tool_flags(memory_plan, args, monkeypatch)
  try:
    _, devices = memory_plan.checked_config()
  except ConfigError as err:
    if _missing_path(err) is None:
      raise
    return
  assert devices >= 1


@pytest.mark.parametrize("tool, args, says", [
    ("bench", ["--config=configs/simmim_fmnist.py", "--peer=hf"], "compare against MAE"),
    ("bench", ["--config=configs/mae_fmnist.py", "--cpu_devices=two"], "expected 'auto'"),
    ("bench", ["--config=configs/mae_fmnist.py", "--config.data.holdout=5"], "generated batch"),
    ("bench", ["--config=configs/finetune_fmnist.py:scratch",
               "--config.optimizer.layer_decay=0.7"], "layer-wise lr decay"),
    ("memory_plan", ["--config=configs/mae_vitb.py", "--config.knn.every_epochs=3"],
     "would not change the plan")])
def test_the_tools_checks_can_refuse(tool, args, says, without_data_files, monkeypatch):
  """The two tests above can fail: a command their tool refuses is refused by them too."""
  import importlib

  from absl import app
  module = importlib.import_module(f"mim_jax.{tool}")
  tool_flags(module, args, monkeypatch)
  check = module.checked_command if tool == "bench" else module.checked_config
  with pytest.raises((app.UsageError, ConfigError), match=says):
    check()


RECORDER = """#!/usr/bin/env bash
# Stands in for python: records its arguments as a JSON line, reads a script given on stdin.
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$RECORD"
[ "${1:-}" = - ] && cat > /dev/null
exit 0
"""


def test_every_command_of_the_gpu_benchmark_script_passes_its_checks(tmp_path, monkeypatch,
                                                                    without_data_files):
  """docs/gpu_benchmarks.sh runs on a lent GPU, 15 minutes per task: a row refused for a
  stale flag wastes that time. Its commands, as the script builds them with its GPU defaults
  (ViT-L/16 and ViT-B/16 in bf16, batch 256), each pass their tool's start-up checks here."""
  recorder, record = tmp_path / "python", tmp_path / "record.jsonl"
  recorder.write_text(RECORDER)
  recorder.chmod(0o755)
  result = subprocess.run(["bash", str(REPO / "docs" / "gpu_benchmarks.sh"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=str(recorder), RECORD=str(record)),
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  calls = [json.loads(line) for line in record.read_text().splitlines()]
  tools = [c[1] for c in calls if c[0] == "-m"]
  assert tools.count("mim_jax.bench") == 8 and tools.count("mim_jax.main") == 5, tools
  assert "skipped" not in (tmp_path / "out" / "commands.txt").read_text()
  for call in calls:
    if call[:2] == ["-m", "mim_jax.bench"]:
      with monkeypatch.context() as patch:
        _check_bench_command(call[2:], patch)
    elif call[:2] == ["-m", "mim_jax.main"]:
      _check_trainer_command(call[2:], tmp_path)


# The programs whose --help is absl's (the module docstring): every module that calls app.run.
ABSL_CLIS = sorted(str(p.relative_to(REPO)) for p in (REPO / "mim_jax").rglob("*.py")
                   if "app.run(" in p.read_text())


def test_the_absl_programs_are_found():
  assert {"mim_jax/main.py", "mim_jax/bench.py", "mim_jax/memory_plan.py"} <= set(ABSL_CLIS)


@pytest.mark.parametrize("module", ABSL_CLIS)
def test_help_prints_the_module_docstring_as_written(module):
  """absl's `--help` %-formats the docstring of `__main__` with the program's path: a lone '%'
  ("a few % apart") printed as "a few '/path/bench.py'part". A literal per cent sign must be
  written '%%' or in words."""
  doc = ast.get_docstring(ast.parse((REPO / module).read_text()), clean=False)
  assert doc, f"{module} has no docstring for --help"
  specifiers = doc.count("%") - 2 * doc.count("%%")
  assert specifiers == 0, f"{module}'s docstring has a '%' that --help would format"


def _github_anchors(text: str) -> set[str]:
  """The anchors GitHub gives a markdown file's headings (outside code blocks): lower case,
  punctuation dropped, spaces as hyphens, a repeated one suffixed -1, -2, ..."""
  anchors, seen, in_code = set(), {}, False
  for line in text.splitlines():
    if line.startswith("```"):
      in_code = not in_code
    elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
      base = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
      anchors.add(f"{base}-{seen[base]}" if seen.get(base) else base)
      seen[base] = seen.get(base, 0) + 1
  return anchors


@pytest.mark.parametrize("doc", ["README.md", *sorted(f"docs/{p.name}"
                                                     for p in (REPO / "docs").glob("*.md"))])
def test_links_to_headings_of_the_same_file_lead_somewhere(doc):
  """A contents list or a cross-reference (`[text](#anchor)`) names a heading that exists: a
  heading renamed as results arrive breaks no link silently."""
  text = (REPO / doc).read_text()
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  broken = sorted(set(re.findall(r"\]\(#([^)\s]+)\)", prose)) - _github_anchors(text))
  assert not broken, f"{doc}: links to no heading: {broken}"
  assert _github_anchors("# A b\n## What the +10 asks: x (y, 1%)\n# A b\n```\n# c\n```") == {
      "a-b", "what-the-10-asks-x-y-1", "a-b-1"}
