"""``python -m dcgen_core.extract``, as documented: a thin entry point to dcgen_core/tools/extract.py."""

import sys

from .tools.extract import main

if __name__ == "__main__":
    sys.exit(main())
