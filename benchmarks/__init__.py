"""Speed scripts that print and record figures (never timed unit tests), run from the project root as
modules, e.g. ``python -m benchmarks.latency --run minilm``; :mod:`benchmarks.run_cli` is what the run
benchmarks share."""
