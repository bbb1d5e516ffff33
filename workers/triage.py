"""The study's triage decision: which category, and which model at which operating point put it there.

Interface shared by the pipeline (which decides), the results store and worklist (which show it), the study SR
(which states it) and the notifications (which carry it).  The policy that fills it is documented in
docs/outputs.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.messages import Priority
from plugins.types import HIGH_SENSITIVITY, HIGH_SPECIFICITY, OperatingPoint

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
        return (
            f"{self.category}: {self.model} at or above its {point.name} operating point "
            f"(threshold {point.threshold:.3g})"
        )


# -------------------------------------------------------------------------
# The policy
# -------------------------------------------------------------------------

#: The policy :func:`decide` applies, in the words the worklist and docs/outputs.md use.
POLICY = (
    "high when any model's risk is at or above its high-specificity operating point; intermediate when "
    "at or above its high-sensitivity point; else routine. A model whose weights bring no operating "
    "point uses triage.high_risk_threshold as its high point and half of it as its intermediate point"
)
#: The name of the site-wide fallback point (``triage.high_risk_threshold``) in decisions.
FALLBACK_HIGH = "high_risk_threshold"
FALLBACK_INTERMEDIATE = "half_high_risk_threshold"


@dataclass(frozen=True, kw_only=True)
class ModelRisk:
    """One model's study-level risk (its highest image risk) and the operating points it is read against."""

    model: str
    risk: float
    operating_points: tuple[OperatingPoint, ...] = ()


def category_points(
    model: ModelRisk,
    *,
    high_point: str = HIGH_SPECIFICITY,
    intermediate_point: str = HIGH_SENSITIVITY,
    fallback_threshold: float = 0.7,
) -> dict[str, OperatingPoint]:
    """The operating point of *model* each urgent category is decided at, by category (high, intermediate).

    A category whose named point the model lacks is left out, unless the model has no operating point at
    all: then the site-wide *fallback_threshold* (``triage.high_risk_threshold``) is its high point and
    half of it its intermediate point, as before operating points existed.
    """
    if not model.operating_points:
        return {
            "high": OperatingPoint(name=FALLBACK_HIGH, threshold=fallback_threshold),
            "intermediate": OperatingPoint(name=FALLBACK_INTERMEDIATE, threshold=fallback_threshold / 2),
        }
    by_name = {point.name: point for point in model.operating_points}
    points = {}
    if high_point in by_name:
        points["high"] = by_name[high_point]
    if intermediate_point in by_name:
        points["intermediate"] = by_name[intermediate_point]
    return points


def decide(
    models: Sequence[ModelRisk],
    *,
    high_point: str = HIGH_SPECIFICITY,
    intermediate_point: str = HIGH_SENSITIVITY,
    fallback_threshold: float = 0.7,
) -> TriageDecision:
    """The study's triage category from each model's risk read against that model's own operating points.

    Scores of different models mean different things (a calibrated probability, p(BI-RADS >= 4), a
    sigmoid of a BI-RADS score), so they are never compared with each other or with one global number:
    each is compared with its own model's thresholds, and the most urgent category any model reaches
    wins (:data:`POLICY`).  Among the models that reach it, the one furthest above its threshold decides;
    when none reaches a point, the model with the highest risk is named.

    :param models: each model's study-level risk and its operating points.
    :param high_point: the operating point name that makes a study ``high``.
    :param intermediate_point: the operating point name that makes it ``intermediate``.
    :param fallback_threshold: ``triage.high_risk_threshold``, for models without operating points.
    """
    if not models:
        return TriageDecision(category="routine", risk=None, model=None, operating_point=None, policy=POLICY)
    for category in ("high", "intermediate"):
        reached = []
        for model in models:
            point = category_points(
                model,
                high_point=high_point,
                intermediate_point=intermediate_point,
                fallback_threshold=fallback_threshold,
            ).get(category)
            if point is not None and model.risk >= point.threshold:
                reached.append((model.risk - point.threshold, model, point))
        if reached:
            _, model, point = max(reached, key=lambda item: item[0])
            return TriageDecision(
                category=category, risk=model.risk, model=model.model, operating_point=point, policy=POLICY
            )
    top = max(models, key=lambda m: m.risk)
    return TriageDecision(
        category="routine", risk=top.risk, model=top.model, operating_point=None, policy=POLICY
    )


#: The queue priority of the study's remaining work and deliveries, by category.
CATEGORY_PRIORITY = {"high": Priority.STAT, "intermediate": Priority.ELEVATED, "routine": Priority.ROUTINE}


def priority(decision: TriageDecision) -> Priority:
    """The queue priority a triage decision gives (``high`` is STAT, as a risk above the threshold was)."""
    return CATEGORY_PRIORITY[decision.category]
