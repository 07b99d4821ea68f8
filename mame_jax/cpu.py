"""XLA settings for the CPU backend, applied when ``mame_jax`` is imported.

jax 0.10.2's XLA hands every matmul, reduction and convolution of a CPU program
to YNNPACK (``__ynn_fusion`` in the optimised HLO). On the 2-core x86-64 (AVX2)
machine of ``benchmarks/cpu_peer.py`` the same programs ran faster with XLA's
own code and Eigen doing that work: the ViT-S/16 forward in 2.61 s instead of
3.87 s at batch 32 (1.48x) and in 76 instead of 95 ms at batch 1
(``results/cpu_peer.json``, the cores to itself), which brought it level with
timm's. Runs beside other jobs gave 1.2-1.5x at batch 32, and 2% and 13% slower
at batch 1 (``results/cpu_peer_flags_*.json``): at batch 1 the gain is not sure.
BENCHMARKS.md's "The CPU beside PyTorch" section has every run and its command.
So, on x86-64, ``mame_jax`` sets

    --xla_cpu_experimental_ynn_fusion_type=      (an empty list: no YNNPACK fusions)

in ``XLA_FLAGS`` before jax starts a backend, with these rules:

* only the CPU backend reads it (an ``xla_cpu_*`` option); GPU programs are
  untouched;
* a flag that ``XLA_FLAGS`` already names is left as the user set it;
  ``MAME_JAX_CPU_SETTINGS=0`` leaves XLA's defaults alone altogether;
* nothing is set once jax has started a backend (XLA has read its flags by
  then): import ``mame_jax`` before running anything in jax, or set the flag
  yourself;
* results change only by float32 rounding (the order of the sums in a matmul):
  ``tests/test_cpu_peer.py`` checks the photographs' logits with and without.

``benchmarks/cpu_peer.py --parts flags`` times other options this XLA offers
against the defaults (oneDNN or XNNPACK for the matmuls, YNNPACK for some of the
work only, YNNPACK's element-wise fusions); none beat turning YNNPACK off
consistently, and with YNNPACK off oneDNN's matmul fusions aborted the process
while compiling the single operations of ``--parts ops`` ("partition compile
failed"), so the package sets nothing else.
"""

from __future__ import annotations

import os
import platform
import re

# The XLA options the package sets on the CPU backend: DebugOptions field -> value,
# spelled as compiler options (``jax.jit(...).lower(...).compile(compiler_options=)``).
# An empty list of YNNPACK fusion types turns YNNPACK's fusions off.
SETTINGS: dict = ({"xla_cpu_experimental_ynn_fusion_type": ""}
                  if platform.machine().lower() in ("x86_64", "amd64") else {})
# XLA's own values of SETTINGS' fields and of the others benchmarks/cpu_peer.py
# tries, in the same spelling: compiling with them reverts a setting. The YNNPACK
# list is the one jax 0.10.2's XLA uses when nothing is set (its optimised
# programs have the same YNNPACK fusions with and without it spelled out).
XLA_DEFAULTS = {
    "xla_cpu_use_onednn": False,
    "xla_cpu_experimental_onednn_fusion_type": "",
    "xla_cpu_experimental_xnn_fusion_type": "",
    "xla_cpu_experimental_ynn_fusion_type": ",".join(
        f"LIBRARY_FUSION_TYPE_{n}" for n in ("DOT", "REDUCE", "INDIVIDUAL_CONVOLUTION")),
    "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_DISABLED",
    "xla_cpu_use_xnnpack": True,
    "xla_cpu_opt_preset": "CPU_OPT_PRESET_DEFAULT",
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT",
    "xla_cpu_use_fusion_emitters": True,
    "xla_cpu_multi_thread_eigen": True,
    "xla_cpu_prefer_vector_width": 256,
}
# Set to 0 to leave XLA's defaults alone (the settings are then never added).
OPT_OUT_ENV = "MAME_JAX_CPU_SETTINGS"

_applied: dict = {}


def xla_flag(name: str, value) -> str:
  """One ``XLA_FLAGS`` entry for a compiler option: ``--name=value``, booleans as
  ``true`` / ``false`` and a list of library fusion types in the flag's own
  spelling (``LIBRARY_FUSION_TYPE_DOT,...`` -> ``dot,...``)."""
  if isinstance(value, bool):
    value = "true" if value else "false"
  elif isinstance(value, str) and value.startswith("LIBRARY_FUSION_TYPE_"):
    value = ",".join(v.removeprefix("LIBRARY_FUSION_TYPE_").lower() for v in value.split(","))
  return f"--{name}={value}"


def apply(environ=None) -> dict:
  """Adds each of :data:`SETTINGS` to ``XLA_FLAGS`` in ``environ`` (``os.environ``)
  unless ``XLA_FLAGS`` already names that flag -- the user's choice wins -- or
  ``MAME_JAX_CPU_SETTINGS=0``. Returns the settings it added.

  XLA reads ``XLA_FLAGS`` once, when jax starts its first backend; once a backend
  is running nothing is added (importing jax starts none).
  """
  environ = os.environ if environ is None else environ
  if not SETTINGS or environ.get(OPT_OUT_ENV, "1") == "0" or _backends_started():
    return {}
  flags = environ.get("XLA_FLAGS", "")
  named = set(re.findall(r"--?(\w+)", flags))
  added = {k: v for k, v in SETTINGS.items() if k not in named}
  if added:
    environ["XLA_FLAGS"] = " ".join([flags.strip()] + [xla_flag(k, v) for k, v in added.items()]
                                    ).strip()
  if environ is os.environ:
    _applied.update(added)
  return added


def applied() -> dict:
  """The settings the import of ``mame_jax`` added to ``XLA_FLAGS`` (empty when the
  user named them all, opted out, or jax had started a backend already)."""
  return dict(_applied)


def _backends_started() -> bool:
  """Whether jax has started a backend (read from jax's internals; a jax that
  moved them counts as not started, so the flags are still added)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False
