"""``python -m etu_hf`` is the ``etu-hf`` command."""

import sys

from etu_hf.cli import main

sys.exit(main())
