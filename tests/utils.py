"""Test helpers shared across the suite: free ports, small DICOM instances, process waits."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def get_port() -> int:
    """A free TCP port on loopback (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> object:
    """Poll *predicate* until it returns something truthy; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def make_instance(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "MG",
    laterality: str = "L",
    view: str = "CC",
    rows: int = 32,
    cols: int = 24,
    sop_class_uid: str | None = None,
    patient_name: str = "SYNTH^TESTPATIENT",
    patient_id: str = "SYNTH-0001",
    seed: int = 0,
) -> Dataset:
    """A small but complete 16-bit greyscale instance, valid enough for storage and decoding."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid or (MG_FOR_PRESENTATION if modality == "MG" else CT_IMAGE)
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261126"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "SYNTH0001"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "pacs-triage tests"
    ds.Modality = modality
    if modality == "MG":
        ds.ImageLaterality = laterality
        ds.ViewPosition = view
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PatientOrientation = ["P", "L" if laterality == "R" else "R"] if view == "CC" else ["A", "FR"]
        ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    return ds


def four_view_study(study_uid: str | None = None, **kwargs: object) -> list[Dataset]:
    """The four standard screening views L/R x CC/MLO of one study."""
    study_uid = study_uid or generate_uid()
    series = generate_uid()
    return [
        make_instance(study_uid=study_uid, series_uid=series, laterality=lat, view=view, **kwargs)  # type: ignore[arg-type]
        for lat in ("L", "R") for view in ("CC", "MLO")
    ]


def write(ds: Dataset, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
