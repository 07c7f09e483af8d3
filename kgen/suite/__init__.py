"""The invariant suite `kgen test` runs on pytest (fixtures from kgen.pytest_plugin)."""
