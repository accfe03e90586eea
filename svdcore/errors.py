"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A bad parameter, a missing file or an unusable artifact.

    Stages print its message as a single line and exit with status 2; anything else is a bug
    and keeps its traceback. `artifact`: the path of the file or folder that is missing or wrong,
    when that is the trouble; the library names it, and the stage layer adds which stage
    rebuilds it (the library knows nothing of the pipeline).
    """

    def __init__(self, message: str, artifact=None):
        super().__init__(message)
        self.artifact = None if artifact is None else str(artifact)
