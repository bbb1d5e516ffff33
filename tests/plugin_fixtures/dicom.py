"""Small synthetic DICOM images for the plugin tests: mammograms (2D, For Processing, DBT) and ultrasound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


#: The VOI LUT ``write_mammogram(voi_lut=True)`` writes: 0..4095 -> 4095 * sqrt(x / 4095).
SQRT_LUT = np.rint(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)


def mammogram_pixels(rows: int, cols: int, chest_wall: str = "left", seed: int = 0) -> np.ndarray:
    """A 12-bit breast: a half-ellipse against the chest-wall edge, textured, with a marker label."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    depth = x / (0.7 * cols)  # distance from the chest wall, 1 at the nipple
    height = (y - rows / 2) / (0.42 * rows)
    breast = depth**2 + height**2 <= 1.0
    tissue = 2200 - 900 * depth + 250 * rng.standard_normal((rows, cols))
    pixels = np.where(breast, np.clip(tissue, 600, 4000), 40.0)
    lesion = (x - 0.35 * cols) ** 2 + (y - 0.45 * rows) ** 2 <= (0.05 * min(rows, cols)) ** 2
    pixels[lesion] = 3600
    pixels[rows - rows // 12 : rows - rows // 24, cols - cols // 6 : cols - cols // 12] = 4000  # lead marker
    if chest_wall == "right":
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels.astype(np.uint16))


def _base_dataset(sop_class: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN0001"
    ds.StudyDate = "20250101"
    ds.InstanceNumber = 1
    return ds


def _set_pixels(
    ds: Dataset, frames: np.ndarray, *, rows: int, cols: int, bits_stored: int, transfer_syntax: str
) -> None:
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = frames.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = frames.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)


def write_mammogram(
    path: Path,
    *,
    rows: int = 320,
    cols: int = 256,
    laterality: str = "L",
    view: str = "CC",
    sop_class: str = MG_FOR_PRESENTATION,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    window: bool = True,
    voi_lut: bool = False,
    seed: int = 0,
) -> Path:
    """Write a synthetic mammogram; a right breast's chest wall is on the right, as displayed.

    :param voi_lut: Add a VOI LUT Sequence whose LUT is a square-root curve over 0..4095.
    """
    ds = _base_dataset(sop_class, "MG")
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PresentationIntentType = "FOR PROCESSING" if sop_class == MG_FOR_PROCESSING else "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    pixels = mammogram_pixels(rows, cols, "right" if laterality == "R" else "left", seed)
    if photometric == "MONOCHROME1":
        pixels = (4095 - pixels).astype(np.uint16)
    if window:
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
    if voi_lut:
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.LUTExplanation = "square root"
        item.add_new("LUTData", "US", SQRT_LUT.tolist())
        ds.VOILUTSequence = Sequence([item])
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack(
            [np.clip(pixels.astype(np.int32) + 100 * i, 0, 4095).astype(np.uint16) for i in range(frames)]
        )
    _set_pixels(ds, pixels, rows=rows, cols=cols, bits_stored=12, transfer_syntax=transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ultrasound(
    path: Path,
    *,
    rows: int = 120,
    cols: int = 160,
    frames: int = 4,
    region: tuple[int, int, int, int] = (20, 30, 80, 100),
    body_part: str = "BREAST",
) -> Path:
    """Write an RGB multi-frame ultrasound with a Sequence of Ultrasound Regions; frame 2 is the brightest.

    *body_part* is its Body Part Examined: a breast unit's by default, which the default routing needs.
    """
    ds = _base_dataset(US_MULTIFRAME, "US")
    ds.BodyPartExamined = body_part
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    stack = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    top, left, height, width = region
    rng = np.random.default_rng(1)
    for i in range(frames):
        speckle = rng.integers(0, 60 if i != 2 else 250, size=(height, width), dtype=np.uint8)
        stack[i, top : top + height, left : left + width] = speckle[..., None]
    stack[:, 2:8, 2:40] = 255  # burnt-in text outside the region
    item = Dataset()
    item.RegionSpatialFormat = 1
    item.RegionDataType = 1
    item.RegionFlags = 0
    item.RegionLocationMinX0 = left
    item.RegionLocationMinY0 = top
    item.RegionLocationMaxX1 = left + width - 1
    item.RegionLocationMaxY1 = top + height - 1
    ds.SequenceOfUltrasoundRegions = Sequence([item])
    _set_pixels(ds, stack, rows=rows, cols=cols, bits_stored=8, transfer_syntax=ExplicitVRLittleEndian)
    ds.save_as(path, enforce_file_format=True)
    return path
