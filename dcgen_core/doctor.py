"""``python -m dcgen_core.doctor``, as documented: a thin entry point to dcgen_core/tools/doctor.py."""

import sys

from .tools.doctor import main

if __name__ == "__main__":
    sys.exit(main())
