"""The test harness: the pytest plugin, `kgen test`, `kgen run`, kernel sessions and benchmarks."""
