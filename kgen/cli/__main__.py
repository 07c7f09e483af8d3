"""`python -m kgen.cli`: the same as the `kgen` command."""
import sys

from kgen.cli import main

sys.exit(main())
