"""The root of the errors a user meets: the CLI catches `UserError` once and prints its message as one line."""


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, a store or server that cannot be reached. Its message
    is one line (one per problem for a config) that names the fix; the CLI prints it without a traceback, exit 2.
    Subclasses keep a builtin base (ValueError, RuntimeError, ...) where callers catch them by it."""
