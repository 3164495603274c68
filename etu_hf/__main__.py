"""``python -m etu_hf`` is the ``etu-hf`` command."""

import sys

from etu_hf.commands.cli import main

sys.exit(main())
