"""The user-facing errors: one line that says what is wrong and what to do.

The CLI turns them into ``error: ...`` and exit code 1, the server into a 4xx with a JSON reason.
Anything else that escapes is a bug in edgekidney, not a user's mistake.
"""


class EdgeKidneyError(Exception):
    """A problem the user can act on (bad input, missing package, incompatible artifact)."""


class InputError(EdgeKidneyError):
    """An input image, folder or dataset cannot be used."""


class ImageTooLargeError(InputError):
    """An image whose declared size is over the decode limits (the server answers 413, not 422)."""


class ModelError(EdgeKidneyError):
    """A model, sidecar or engine cannot be used."""


class DependencyError(EdgeKidneyError):
    """An optional package needed for this path is not installed."""


class GateError(EdgeKidneyError):
    """A quality gate (accuracy, parity, latency) failed."""


def exit_code(call) -> int:
    """Run ``call`` for a module's ``main``: 0, or 1 with one ``error: ...`` line on stderr for a user error
    (an :class:`EdgeKidneyError` or an unreadable or unwritable file)."""
    import sys

    try:
        call()
    except (EdgeKidneyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
