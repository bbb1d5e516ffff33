"""Deterministic UIDs for the objects we send back, so a retry re-sends the same instances."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import UID, generate_uid

from gateway.provenance import ORG_ROOT  # the gateway owns the root: it recognises our outputs by it

#: Salt that keeps our derived UIDs apart from anything else hashed under the same root.
_NAMESPACE = "pacs-triage/outputs/v1"


def derive_uid(*parts: str) -> UID:
    """Return a UID under :data:`ORG_ROOT` that depends only on *parts*, in order.

    pydicom hashes ``"".join(entropy_srcs)``, so ``("ab", "c")`` and ``("a", "bc")`` would
    collide; each part is therefore length-prefixed before hashing.

    :param parts: The inputs the UID stands for (study UID, model id, version, kind...).
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    framed = "".join(f"{len(part)}:{part};" for part in (_NAMESPACE, *parts))
    return generate_uid(prefix=ORG_ROOT, entropy_srcs=[framed])


def _sorted_unique(uids: Iterable[str]) -> list[str]:
    # The order in which images were evaluated must not change the UID of the report.
    return sorted({str(uid) for uid in uids})


def sr_series_uid(study_uid: str, model_id: str, model_version: str) -> UID:
    """Series Instance UID of a model's SR documents in one study.

    :param study_uid: Study Instance UID of the evaluated study.
    :param model_id: The model's stable id, e.g. ``asg_mammonet.v1``.
    :param model_version: The model's version string.
    """
    return derive_uid("sr-series", study_uid, model_id, model_version)


def sr_instance_uid(
    study_uid: str,
    source_sop_instance_uids: Iterable[str],
    model_id: str,
    model_version: str,
    source_digests: Iterable[str] = (),
) -> UID:
    """SOP Instance UID of the SR that reports *model_id* on these source images.

    :param study_uid: Study Instance UID of the evaluated study.
    :param source_sop_instance_uids: SOP Instance UIDs of every evaluated image (any order).
    :param model_id: The model's stable id.
    :param model_version: The model's version string.
    :param source_digests: Digests of the sources' content (any order).  A source resent with the
        same UID but other bytes then gives a new report UID: a PACS keeps the first object it got
        under a UID and would silently drop the new findings.
    """
    digests = _sorted_unique(source_digests)
    return derive_uid(
        "sr-instance",
        study_uid,
        *_sorted_unique(source_sop_instance_uids),
        model_id,
        model_version,
        *(["content", *digests] if digests else []),
    )


def sc_series_uid(study_uid: str, model_id: str, model_version: str) -> UID:
    """Series Instance UID of a model's heatmap Secondary Captures in one study.

    :param study_uid: Study Instance UID of the evaluated study.
    :param model_id: The model's stable id.
    :param model_version: The model's version string.
    """
    return derive_uid("sc-series", study_uid, model_id, model_version)


def sc_instance_uid(
    study_uid: str,
    source_sop_instance_uid: str,
    model_id: str,
    model_version: str,
    frame_index: int = 0,
    source_digest: str = "",
) -> UID:
    """SOP Instance UID of the heatmap Secondary Capture of one source image (or frame).

    :param study_uid: Study Instance UID of the evaluated study.
    :param source_sop_instance_uid: SOP Instance UID of the source image.
    :param model_id: The model's stable id.
    :param model_version: The model's version string.
    :param frame_index: Zero-based frame of a multi-frame source.
    :param source_digest: Digest of the source's content: new bytes under the same source UID
        give a new heatmap UID (see :func:`sr_instance_uid`).
    """
    return derive_uid(
        "sc-instance",
        study_uid,
        source_sop_instance_uid,
        model_id,
        model_version,
        str(frame_index),
        *(["content", source_digest] if source_digest else []),
    )


def tracking_uid(sr_uid: str, label: str) -> UID:
    """Tracking Unique Identifier of one measurement group inside an SR.

    :param sr_uid: SOP Instance UID of the SR that holds the group.
    :param label: A label unique within that SR, e.g. ``image:<sop uid>:class:malignant``.
    """
    return derive_uid("tracking", sr_uid, label)


def device_uid(model_id: str, model_version: str) -> UID:
    """Device Observer UID of one model version (TID 1004).

    :param model_id: The model's stable id.
    :param model_version: The model's version string.
    """
    return derive_uid("device", model_id, model_version)
