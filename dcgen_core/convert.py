"""``python -m dcgen_core.convert``, as documented: a thin entry point to dcgen_core/tools/convert.py."""

import sys

from .tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
