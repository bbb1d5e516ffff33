"""Which received objects this project made itself: our SR and SC outputs, sent back by a PACS.

A PACS may forward a whole study back, our own outputs included.  They are stored like anything
else, but must never start an analysis: the models would run again on their own results and
deliver them again.  The gateway owns the UID root, so it can tell them apart without the workers.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

#: The one organisation root of every UID this project makes.  It is pydicom's root, which pydicom
#: offers for UIDs derived with ``generate_uid``; a site with its own registered root replaces it
#: here and nowhere else.  At most 54 characters, ending with a dot.
ORG_ROOT = "1.2.826.0.1.3680043.8.498."

#: The Manufacturer (0008,0070) written in every Contributing Equipment item we add, and by
#: default on the objects themselves.
CREATOR = "pacs-triage"


def is_own_output(header: Dataset) -> bool:
    """Whether *header* is an object this project made.

    Its SOP Instance UID must lie under :data:`ORG_ROOT`, and it must name us as its creator:
    either a Contributing Equipment Sequence (0018,A001) item (added to every SR and SC we build,
    whatever Manufacturer a site configures for the object itself) or the top-level Manufacturer.
    Both marks are needed: other programs use pydicom's UID root too.

    :param header: The data set's header; reading it may raise whatever pydicom raises for
        malformed values, so call it where a decoding failure is already handled.
    """
    if not str(header.get("SOPInstanceUID", "") or "").startswith(ORG_ROOT):
        return False
    if str(header.get("Manufacturer", "") or "") == CREATOR:
        return True
    equipment = header.get("ContributingEquipmentSequence") or ()
    return any(str(item.get("Manufacturer", "") or "") == CREATOR for item in equipment)
