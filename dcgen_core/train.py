"""``python -m dcgen_core.train``, as documented: a thin entry point to dcgen_core/tools/train/__main__.py."""

import sys

from .tools.train.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
