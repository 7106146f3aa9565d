"""`python -m diffembed_hf`: the `diffembed` command (what torchrun launches with `-m diffembed_hf`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
