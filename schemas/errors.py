"""The one exception type for mistakes a user can fix: the command line prints its message, no traceback."""


class UserError(Exception):
    """A problem with the user's input (a manifest, a spec, a model directory, a flag) that they can fix.

    The message must say what is wrong and what was expected; the command line prints it and exits 2.
    """
