"""XLA compiler options of one run: `config.compiler_options`, written as in XLA_FLAGS.

  parse(text)                 "--xla_backend_optimization_level=0 --xla_gpu_enable_command_buffer="
                              -> {"xla_backend_optimization_level": "0",
                                  "xla_gpu_enable_command_buffer": ""}
  validate(config)            the syntax (static: no backend started)
  check(config)               each name known to this backend's XLA (one trivial compile)
  jit(config, fn, **kwargs)   jax.jit(fn, **kwargs) compiled with the run's options
  jit_with(fn, options, ...)  the same for library helpers that take options, not a config
                              (k-NN, the logistic probe): one wrapper per (fn, options)

XLA_FLAGS applies to every program of a process and is read once, when the backend starts.
These options apply to the programs of one run (its train step, initialisation, evaluation,
reconstruction pictures, frozen features, k-NN scoring and probe fits), so a benchmark can
time variants side by side in one process, and a smoke run (`:runlocal`) compiles at LLVM's
lowest optimisation level: a 2-step run is bound by compilation, not by the speed of the code.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import jax

from mim_jax.config.errors import config_error

_OPTION = re.compile(r"--(xla_[A-Za-z0-9_]+)=(\S*)")
_SYNTAX = ("space-separated --xla_NAME=VALUE options, as in XLA_FLAGS (e.g. "
           "'--xla_backend_optimization_level=0'), or ''")


def _value(text: str) -> Any:
  """The value as XLA takes it: booleans as such (XLA refuses the text "true"), everything else
  as text, which XLA parses by the option's own type ("1" is a valid float option, 1 is not)."""
  if text in ("true", "false"):
    return text == "true"
  return text


def parse(text: str) -> dict[str, Any]:
  """{name: value} of `text`; ValueError naming the first malformed word."""
  options = {}
  for word in text.split():
    match = _OPTION.fullmatch(word)
    if not match:
      raise ValueError(f"{word!r} is not --xla_NAME=VALUE")
    options[match.group(1)] = _value(match.group(2))
  return options


def of(config) -> dict[str, Any] | None:
  """The run's options, None without any (jax.jit's default)."""
  return parse(config.get("compiler_options", "")) or None


def validate(config) -> None:
  text = config.get("compiler_options", "")
  if not isinstance(text, str):
    raise config_error("compiler_options", text, _SYNTAX)
  try:
    parse(text)
  except ValueError as e:
    raise config_error("compiler_options", text, _SYNTAX, str(e)) from None


def check(config) -> None:
  """Compiles a trivial program with the options, so that a name this backend's XLA does not
  know fails here, named, before the run builds anything (needs the backend: call it after
  jax.distributed.initialize)."""
  options = of(config)
  if not options:
    return
  try:
    jax.jit(lambda: 0, compiler_options=options).lower().compile()
  except jax.errors.JaxRuntimeError as e:  # "No such compile option", a value of a wrong type
    raise config_error("compiler_options", config.compiler_options,
                       f"options the {jax.default_backend()} backend's XLA knows, with values "
                       "of their types", str(e).splitlines()[0] if str(e) else "") from None


def jit(config, fn: Callable, **kwargs) -> Callable:
  """jax.jit(fn, **kwargs) with the run's compiler options."""
  return jax.jit(fn, compiler_options=of(config), **kwargs)


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, options: tuple, static_argnames: tuple) -> Callable:
  return jax.jit(fn, static_argnames=static_argnames,
                 compiler_options={name: value for name, _, value in options} or None)


def jit_with(fn: Callable, options: Mapping[str, str | bool] | None, *,
             static_argnames: str | tuple[str, ...] = ()) -> Callable:
  """jax.jit(fn, static_argnames=...) compiled with `options` ({name: text or bool}, as
  `of(config)` gives them; None: XLA's defaults). The wrapper is kept for the process, one per
  (fn, options), so a helper called once per evaluation traces and compiles once per shape."""
  if isinstance(static_argnames, str):
    static_argnames = (static_argnames,)
  # The value's type is part of the key: True == 1 in Python, not to XLA (`_value`).
  key = tuple(sorted((name, type(value).__name__, value)
                     for name, value in (options or {}).items()))
  return _jitted(fn, key, tuple(static_argnames))
