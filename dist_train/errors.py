"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths).

The CLI turns it into a single line on stderr and exit status 2, never a traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and how to fix it."""
