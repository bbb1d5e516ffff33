"""The default high-risk notification: one structured log line per high-risk study."""

from __future__ import annotations

import structlog

from plugins import hookimpl
from plugins.types import Prediction

log = structlog.get_logger(__name__)


@hookimpl
def pacs_triage_high_risk_study(study_instance_uid: str, risk: float, predictions: list[Prediction]) -> None:
    """Log the study UID, its risk and which models flagged it; no patient identifiers."""
    log.warning(
        "study.high_risk",
        study_uid=study_instance_uid,
        risk=round(float(risk), 4),
        models=sorted({p.model_id for p in predictions}),
        images=len({p.image.sop_instance_uid for p in predictions}),
        demo_weights=any(p.demo_weights for p in predictions),
    )
