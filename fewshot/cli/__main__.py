"""``python -m fewshot.cli``, as ``python -m fewshot``."""

import sys

from . import main

sys.exit(main())
