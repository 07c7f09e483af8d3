"""The build stage: config -> layout -> assembled units -> linked image -> ELF -> ISO. `build()` runs it all."""
from kgen.build.pipeline import BuildOutput, build  # noqa: F401  (the stage's entry point)
