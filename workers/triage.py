"""The study's triage decision: which category, and which model at which operating point put it there.

Interface shared by the pipeline (which decides), the results store and worklist (which show it), the study SR
(which states it) and the notifications (which carry it).  The policy that fills it is documented in
docs/outputs.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from plugins.types import OperatingPoint

#: Triage categories, most urgent first.
CATEGORIES = ("high", "intermediate", "routine")


@dataclass(frozen=True, kw_only=True)
class TriageDecision:
    """What the study's triage is, and why."""

    #: One of :data:`CATEGORIES`.
    category: str
    #: The deciding model's risk on the deciding image (or the highest risk when no point was crossed).
    risk: float | None
    #: Plugin name of the model that set the category; None when no model gave a result.
    model: str | None
    #: The operating point whose threshold the risk crossed; None when none was crossed.
    operating_point: OperatingPoint | None
    #: The policy in our own words, e.g. "high when any model is at or above its high-sensitivity point".
    policy: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"triage category must be one of {CATEGORIES}")

    @property
    def explanation(self) -> str:
        """One line for the worklist and the SR: the model and operating point behind the category."""
        if self.model is None:
            return f"{self.category}: no model result"
        if self.operating_point is None:
            return f"{self.category}: {self.model} below all of its operating points"
        point = self.operating_point
        return (f"{self.category}: {self.model} at or above its {point.name} operating point "
                f"(threshold {point.threshold:.3g})")
