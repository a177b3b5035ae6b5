"""The base of every typed config model of facetrain (the trainer's sections, the classifier's
section, each margin head and auxiliary loss): one home for the rules every config value
obeys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Unknown keys fail, assignments are validated, and a NaN or infinite float fails
    (``optimizer.lr: .inf`` would otherwise train to non-finite weights)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
