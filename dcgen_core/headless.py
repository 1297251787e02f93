"""``python -m dcgen_core.headless``, as documented: a thin entry point to dcgen_core/tools/headless.py."""

import sys

from .tools.headless import main

if __name__ == "__main__":
    sys.exit(main())
