"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A bad parameter, a missing file or an unusable artifact.

    Stages print its message as a single line and exit with status 2; anything else is a bug
    and keeps its traceback.
    """
