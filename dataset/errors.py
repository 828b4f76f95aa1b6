"""One exception type whose message is the one-line reason written to the failures file."""


class CaseError(Exception):
    """A case that cannot be used; str(err) is a one-line, user-facing reason."""
