"""The one kind of error a user is meant to read.

Every refusal of bad input (a setting, a search space, a dataset, the store, the cluster)
derives from :class:`UserError`: its message is one line naming the problem and the fix, and
the command line prints it as ``error: ...`` and exits with status 2, before anything starts.
"""


class UserError(Exception):
    """A problem with what was asked, not a bug: one readable line, exit status 2."""
