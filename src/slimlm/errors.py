"""The one exception type slimlm raises for bad input."""


class SlimlmError(Exception):
    """Bad input or an impossible request, with a message meant for the user.

    The CLI prints the message on one line and exits non-zero; library users can catch it.
    """
