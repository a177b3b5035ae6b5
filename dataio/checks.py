"""Kept only for ``dataio.dali_loader``'s import: the check lives in ``common.checks``
(shared with partialfc); import it from there."""

from common.checks import check_int

__all__ = ["check_int"]
