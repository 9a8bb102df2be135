"""clusterfuse benchmarks: harness (`bench.common`), floors (`bench.floor`), baselines
(`bench.baselines`), reports (`bench.report`).  Run from the repository root, e.g.
``python -m bench.report bench/results/attention_block.json --md out.md``."""
