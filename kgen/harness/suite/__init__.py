"""The invariant suite `kgen test` runs on pytest (fixtures from kgen.harness.pytest_plugin)."""
