"""``python -m lightning_attn``: the ``lightning-attn`` command."""

import sys

from .cli import main

sys.exit(main())
