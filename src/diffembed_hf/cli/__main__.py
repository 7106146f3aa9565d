"""`python -m diffembed_hf.cli` (as `python -m diffembed_hf`): the `diffembed` command."""

import sys

from . import main

sys.exit(main())
