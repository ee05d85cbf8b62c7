"""The one exception type for bad user input; command-line tools print it as one line."""


class KvjaxError(Exception):
    """A problem the user can fix (bad flag, missing file, unsupported model), said in one line."""
