"""Errors raised for bad user input.

Every message names the file (or object) involved, what was expected and what
was found, so that a ComfyUI user can tell which widget to change.
"""


class DCGenError(ValueError):
    """Bad input for a DC-Gen operation (wrong file, wrong model, wrong size)."""


def mismatch(subject: str, expected, found, hint: str = "") -> DCGenError:
    msg = f"{subject}: expected {expected}, found {found}."
    if hint:
        msg += " " + hint
    return DCGenError(msg)


class MissingDependencyError(ImportError):
    """An optional dependency needed for this feature is not installed."""
