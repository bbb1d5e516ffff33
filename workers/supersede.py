"""Superseding old results: an IHE IOCM rejection Key Object Selection (KOS) for our earlier SR and SCs.

When a study's results change (a new study version, a retrained model, other weights), the new
outputs get new SOP Instance UIDs and the old ones would stay in the PACS beside them.  The IOCM
profile's "Reject" transaction is a KOS (1.2.840.10008.5.1.4.1.1.88.59) in the same study whose
Document Title is a rejection note from CID 7011 and whose content lists the rejected instances.

The note is (113001, DCM, "Rejected for Quality Reasons").  Of the CID 7011 notes it is the one IHE
IOCM uses for instances that are replaced by better ones and should be hidden from normal use but
may be kept: "Rejected for Patient Safety Reasons" (113037) says the instance is dangerous to
show, "Incorrect Modality Worklist Entry" (113038) that it belongs to another patient or order,
and "Data Retention Policy Expired" (113039) asks the archive to delete it.  None of these is
true of a result a newer analysis replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from workers.outputs import MANUFACTURER
from workers.uids import derive_uid

__all__ = [
    "KOS_SOP_CLASS_UID",
    "REJECTED_FOR_QUALITY_REASONS",
    "SupersededOutput",
    "rejection_kos",
]

#: Key Object Selection Document Storage.
KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"
#: CID 7011 "Rejected for Quality Reasons": the note for a result a newer one replaces (see above).
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")
_KOS_SERIES_NUMBER = 9950

# Patient and study attributes the KOS copies from the evidence (highdicom reads them from it).
_PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SpecificCharacterSet",
)


@dataclass(frozen=True, kw_only=True)
class SupersededOutput:
    """One of our earlier outputs in the PACS that a newer result replaces."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str


def _reference(output: SupersededOutput, study: Dataset) -> Dataset:
    ds = Dataset()
    for keyword in _PATIENT_AND_STUDY:
        if keyword in study:
            setattr(ds, keyword, study.data_element(keyword).value)  # type: ignore[union-attr]
    ds.SeriesInstanceUID = output.series_instance_uid
    ds.SOPInstanceUID = output.sop_instance_uid
    ds.SOPClassUID = output.sop_class_uid
    return ds


def rejection_kos(
    superseded: Sequence[SupersededOutput], study: Dataset, *, manufacturer: str = MANUFACTURER
) -> hd.ko.KeyObjectSelectionDocument:
    """The IOCM rejection KOS that hides *superseded* outputs.

    Its UIDs depend only on the study and the rejected instances, so a retried delivery resends
    the same document.

    :param superseded: The earlier outputs, all in the study of *study*.
    :param study: Any of our current outputs of the study: the KOS copies its patient and study
        attributes (the earlier outputs' files may be gone).
    :param manufacturer: Manufacturer of the "device" (this software).
    :raises ValueError: when *superseded* is empty or names another study.
    """
    if not superseded:
        raise ValueError("no superseded output to reject")
    study_uid = str(study.StudyInstanceUID)
    ordered = sorted(superseded, key=lambda output: output.sop_instance_uid)
    references = [_reference(output, study) for output in ordered]
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=references,
        description="Superseded by a newer AI result (pacs-triage); NOT FOR DIAGNOSTIC USE",
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=references,
        content=content,
        series_instance_uid=derive_uid("iocm-kos-series", study_uid),
        series_number=_KOS_SERIES_NUMBER,
        sop_instance_uid=derive_uid("iocm-kos", study_uid, *(r.SOPInstanceUID for r in references)),
        instance_number=1,
        manufacturer=manufacturer,
    )
