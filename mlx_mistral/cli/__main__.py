"""`python -m mlx_mistral.cli ...` (what `mlx.launch` and `torchrun` start): the `mlx-mistral` command."""

import sys

from . import main

sys.exit(main())
