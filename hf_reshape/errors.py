"""Exceptions raised to users. Each message says what was wrong and what is accepted."""


class ReshapeError(ValueError):
    """Base class of hf_reshape's user-facing errors (a ``ValueError``)."""


class UnknownVariantError(ReshapeError):
    pass


class UnsupportedModelError(ReshapeError):
    pass


class NotCausalError(ReshapeError):
    pass


class InvalidParameterError(ReshapeError):
    pass


class SequenceTooLongError(ReshapeError):
    pass


class AttentionImplementationError(ReshapeError):
    """A reshaped model whose attention implementation was switched away from hf_reshape's (its reshaped layers
    would silently run another attention)."""
