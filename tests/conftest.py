"""Test-session settings.

XLA's CPU backend compiles at LLVM optimisation level 0 here: the tests run tiny
models, so their time goes into compiling, not running, and level 0 compiles
about a third faster (the library itself, benchmarks and users keep XLA's
default). Set before JAX starts its backend; subprocesses and notebook kernels
inherit it. An ``XLA_FLAGS`` that already sets the level wins.
"""

import os

_FLAG = "--xla_backend_optimization_level"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=0".strip()
