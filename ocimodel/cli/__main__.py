"""``python -m ocimodel.cli``: the same as the ``ocimodel`` console script."""

import sys

from ocimodel.cli import main

sys.exit(main())
