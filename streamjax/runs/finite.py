"""The error every long job raises when its numbers stop being finite, so callers catch one type."""


class NonFiniteError(ValueError):
    """A run computed a NaN or infinite loss or NLL; the message names where and what was kept."""
