"""The one exception type of the dev cluster: a single line a user can act on."""

from __future__ import annotations


class DevClusterError(Exception):
    """A failure with a one-line message that says what to do next."""
