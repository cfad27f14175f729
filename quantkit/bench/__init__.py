"""Device benchmarking (``quantkit bench``): load time, time to first token, prefill and decode throughput,
decode latency percentiles and memory of each artifact in its own runtime, with raw samples in JSON Lines,
and a statistical comparison of two runs. Nothing here imports torch: the measuring child stays lean."""

from quantkit.bench.core import SCHEMA, Artifact, BenchError, BenchOptions, Workload, bench, resolve
from quantkit.bench.report import compare, compare_table, read_jsonl, table

__all__ = ["SCHEMA", "Artifact", "BenchError", "BenchOptions", "Workload", "bench", "compare", "compare_table",
           "read_jsonl", "resolve", "table"]
