"""clusterfuse benchmarks: harness (`bench.common`), floors (`bench.floor`), baselines
(`bench.baselines`), reports (`bench.report`).  Run from the repository root, e.g.
``python -m bench.report perf --gpu h100``."""
