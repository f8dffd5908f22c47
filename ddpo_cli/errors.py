"""The one exception type for user mistakes: the CLI prints its message on one line and exits with code 2."""


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file, unreachable model). Message says what and how."""
