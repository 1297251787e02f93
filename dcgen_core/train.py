"""``python -m dcgen_core.train``, as documented: a thin entry point to dcgen_core/tools/train/__main__.py."""

from .tools.train.__main__ import cli

if __name__ == "__main__":
    cli()
