"""The benchmark scripts; BENCHMARKS.md shows what they measured.

Run each one as a module from the repository root, the form every page here
gives:

    python -m benchmarks.vit_throughput --quick

``python benchmarks/vit_throughput.py --quick`` works too. Run as a file, a
script's ``sys.path[0]`` is ``benchmarks/`` itself, so ``import benchmarks...``
(the scripts share helpers) would fail; each script therefore starts, after its
standard-library imports and before any other, with

    if not __package__:  # run as a file, not with -m: see benchmarks/__init__.py
      sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

which puts the repository root there instead (``__package__`` is ``"benchmarks"``
under ``-m`` and when imported, and the line does nothing). A new script needs
the same two lines; ``tests/test_benchmarks.py`` runs every ``benchmarks/*.py``
both ways with ``--help``.
"""
