"""Training code for the CRAFT text detector."""

__all__ = []
