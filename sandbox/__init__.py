"""A local PacSpace: the Balance API as UPSTREAM.md describes it, in memory, with
faults on demand. Our upstream for tests, the demo and the benchmarks."""
