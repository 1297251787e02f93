"""``python -m dcgen_core.quantize``, as documented: a thin entry point to dcgen_core/tools/quantize.py."""

import sys

from .tools.quantize import main

if __name__ == "__main__":
    sys.exit(main())
