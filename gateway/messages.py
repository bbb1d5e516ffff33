"""Messages from the gateway to the workers: UIDs and storage paths, never pixels.

They travel as JSON (never pickle).  ``from_json_dict`` refuses unknown schema versions so that a
mixed-version cluster fails loudly instead of misreading a message.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Self

from gateway.errors import MessageError

SCHEMA_VERSION = 3
#: Versions still read: version 1 lacks ``InstanceRef.study_version`` (read as 0, "unknown"), and
#: versions 1 and 2 lack ``InstanceRef.content_digest`` (read as "") and ``own_output`` (read as False).
READABLE_SCHEMA_VERSIONS = frozenset({1, 2, SCHEMA_VERSION})


class Priority(enum.IntEnum):
    """Queue priority.  On Redis **0 is the highest** priority, the reverse of RabbitMQ."""

    STAT = 0
    HIGH = 2
    ELEVATED = 4
    ROUTINE = 6
    LOW = 9

    @classmethod
    def from_dimse(cls, value: int) -> Priority:
        """Map a C-STORE Priority (0 medium, 1 high, 2 low) to a queue priority."""
        return {1: cls.HIGH, 2: cls.LOW}.get(int(value), cls.ROUTINE)

    @classmethod
    def from_risk(cls, risk: float, high_risk_threshold: float) -> Priority:
        """Map a first-stage risk score to the priority of the study's remaining work."""
        if risk >= high_risk_threshold:
            return cls.STAT
        if risk >= high_risk_threshold / 2:
            return cls.ELEVATED
        return cls.ROUTINE


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRef:
    """One stored instance of a study version."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str
    path: str
    transfer_syntax_uid: str
    #: The study version the instance joined (or was last replaced in); 0 = not said.  A version
    #: whose instances all joined earlier adds no new source image and is not analysed again.
    study_version: int = 0
    #: SHA-256 of the stored file's bytes, hex, first 32 characters, taken by the gateway as it
    #: received them; "" when not known (an older gateway or journal row): hash the file then.
    content_digest: str = ""
    #: An object this project made (gateway.provenance), sent back to us: stored, never analysed.
    own_output: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyJob:
    """A completed study (one version of it), ready for analysis."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    study_instance_uid: str
    study_version: int
    calling_ae: str
    priority: Priority = Priority.ROUTINE
    #: Why the study was declared complete: ``quiet``, ``rule:<name>``, ``force`` or ``recovery``.
    completed_by: str = "quiet"
    #: Root of the storage the paths are relative to; a shared directory by default.
    storage_root: str
    instances: tuple[InstanceRef, ...] = field(default_factory=tuple)

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["priority"] = int(self.priority)
        data["instances"] = [asdict(i) for i in self.instances]
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Self:
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise MessageError(f"unsupported StudyJob schema_version {version!r} (expected {SCHEMA_VERSION})")
        try:
            fields = dict(data, schema_version=SCHEMA_VERSION)
            fields["priority"] = Priority(int(fields.get("priority", Priority.ROUTINE)))
            fields["instances"] = tuple(InstanceRef(**i) for i in fields.get("instances", ()))
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise MessageError(f"malformed StudyJob: {exc}") from exc
