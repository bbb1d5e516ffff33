"""From a DICOM file to a display-ready image and a letterboxed model input, and back to the source.

The decode path follows DICOM PS3.4 Annex N (grayscale pipeline): stored values, then the
Modality LUT (rescale), then the VOI LUT or window, then MONOCHROME1 inversion.  PALETTE COLOR
and YBR images become RGB.  The result is ``uint8``: ``(rows, cols)`` grey or ``(rows, cols, 3)``
RGB, in the source image's geometry.  Every geometric step after that (crop, laterality flip,
letterbox) is recorded in a :class:`~plugins.types.Letterbox` whose inverse maps heatmaps and
points back onto the source pixels exactly.

This module needs numpy, OpenCV and pydicom, not torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

from gateway.errors import PermanentError
from gateway.inflate import read_header
from plugins.types import ImageRef, Letterbox

FramePolicy = Literal["first", "middle", "max_variance", "all"]
FRAME_POLICIES: tuple[str, ...] = get_args(FramePolicy)
CropMode = Literal["none", "breast", "ultrasound"]
CROP_MODES: tuple[str, ...] = get_args(CropMode)

#: Digital Mammography X-Ray Image Storage - For Presentation.
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
#: Breast Tomosynthesis Image Storage: a reconstructed DBT volume.
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
#: Breast Projection X-Ray Image Storage (For Presentation, For Processing): DBT projection sets.
BREAST_PROJECTION = ("1.2.840.10008.5.1.4.1.1.13.1.4", "1.2.840.10008.5.1.4.1.1.13.1.5")
#: "For Processing" (raw detector) SOP classes: DX, MG, intra-oral, breast projection.
FOR_PROCESSING_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.13.1.5",
    }
)

# View Code Sequence meanings (CID 4014) to the ViewPosition abbreviations models are trained on.
_VIEW_MEANINGS = {
    "cranio-caudal": "CC",
    "medio-lateral oblique": "MLO",
    "medio-lateral": "ML",
    "latero-medial": "LM",
    "latero-medial oblique": "LMO",
    "exaggerated cranio-caudal": "XCC",
    "cranio-caudal exaggerated laterally": "XCCL",
    "cranio-caudal exaggerated medially": "XCCM",
    "caudo-cranial (from below)": "FB",
    "superolateral to inferomedial oblique": "SIO",
}


# -------------------------------------------------------------------------
# Header
# -------------------------------------------------------------------------


def read_image_ref(path: str | os.PathLike[str]) -> ImageRef:
    """Describe the image at *path* from its header only (pixel data is not read).

    :raises PermanentError: naming the file when it is not DICOM, its header cannot be decoded, or
        it lacks a required UID.
    """
    path = Path(path)
    try:
        return _image_ref(path)
    except PermanentError:
        raise
    except Exception as exc:  # pydicom decodes elements lazily and raises many types on bad bytes
        # The type only: pydicom's messages quote the offending value (a birth date, a name).
        raise PermanentError(f"{path} is not a readable DICOM file: {type(exc).__name__}") from exc


def _image_ref(path: Path) -> ImageRef:
    # gateway.inflate's reader: pydicom inflates a deflated data set whole even for its header.
    return image_ref_from_header(read_header(path), path)


def image_ref_from_header(ds: Dataset, path: Path) -> ImageRef:
    """Describe the image at *path* from its already read header *ds* (see :func:`read_image_ref`)."""
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if not value:
            raise PermanentError(f"{path} has no {keyword}")
        uids[keyword] = value
    sop_class = str(
        ds.get("SOPClassUID", "") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID", "")
    )
    return ImageRef(
        path=path,
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=sop_class,
        modality=str(ds.get("Modality", "") or ""),
        laterality=_laterality(ds),
        view=_view(ds),
        presentation_intent=str(ds.get("PresentationIntentType", "") or "").upper(),
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
        us_region=ultrasound_region(ds),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=int(ds.get("BitsAllocated", 16) or 16),
        body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper(),
        anatomic_region=tuple(
            str(item.get(keyword, "") or "").strip().upper()
            for item in ds.get("AnatomicRegionSequence", [])
            for keyword in ("CodeValue", "CodeMeaning")
            if item.get(keyword)
        ),
    )


def _laterality(ds: Dataset) -> str:
    value = ds.get("ImageLaterality") or ds.get("Laterality")
    if not value:
        anatomy = _functional_group_item(ds, 0, "FrameAnatomySequence")
        value = anatomy.get("FrameLaterality", "") if anatomy is not None else ""
    return str(value or "").upper()


def _view(ds: Dataset) -> str:
    if ds.get("ViewPosition"):
        return str(ds.ViewPosition).upper()
    for item in ds.get("ViewCodeSequence", []):
        meaning = str(item.get("CodeMeaning", "")).strip().lower()
        if meaning in _VIEW_MEANINGS:
            return _VIEW_MEANINGS[meaning]
    return ""


def ultrasound_region(ds: Dataset) -> tuple[int, int, int, int] | None:
    """The first 2-D region of the Sequence of Ultrasound Regions as (top, left, height, width)."""
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        if int(region.get("RegionSpatialFormat", 0) or 0) != 1:  # 1 = 2-D tissue or flow image
            continue
        x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
        x1, y1 = int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1)
        if x1 >= x0 and y1 >= y0:
            return (y0, x0, y1 - y0 + 1, x1 - x0 + 1)
    return None


def _functional_group_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    # Enhanced multi-frame objects keep per-frame values in functional groups, per frame or shared.
    for groups, item_index in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items is not None and len(items) > item_index and sequence in items[item_index]:
            return items[item_index][sequence][0]
    return None


# -------------------------------------------------------------------------
# Pixel decoding
# -------------------------------------------------------------------------


#: Single-frame image IODs of the modalities we read (CR, DX and MG for presentation and processing, US Image,
#: Secondary Capture, VL Photographic): one frame, whatever Number of Frames an instance carries.
SINGLE_FRAME_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.77.1.4",
    }
)


def decode_frames(
    path: str | os.PathLike[str], policy: FramePolicy = "middle"
) -> list[tuple[int, np.ndarray]]:
    """Decode the frames of *path* that *policy* selects into display-ready ``uint8`` images.

    :param path: A DICOM file in any transfer syntax pydicom's pixel plugins decode.
    :param policy: ``first``, ``middle``, ``max_variance`` (the frame with the most contrast,
        e.g. a cine loop's least blank frame) or ``all``.  Single-frame images give one frame.
    :returns: (frame index, image) pairs, the image ``(rows, cols)`` grey or ``(rows, cols, 3)`` RGB.
    :raises PermanentError: naming the file and its transfer syntax when it cannot be decoded.
    """
    if policy not in FRAME_POLICIES:
        raise ValueError(f"frame policy {policy!r} is not one of {', '.join(FRAME_POLICIES)}")
    path = Path(path)
    transfer_syntax = "unknown transfer syntax"
    try:
        ds = pydicom.dcmread(path)
        transfer_syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", transfer_syntax)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise PermanentError(f"{path} has no pixel data")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 and str(ds.get("SOPClassUID", "")) in SINGLE_FRAME_SOP_CLASSES:
            try:
                return _decode(ds, policy, path, frames)
            except Exception:
                # A single-frame IOD (a US Image) whose Number of Frames says more than its data holds, as
                # some scanners write: the standard and highdicom treat it as one frame; so is it here.
                ds.NumberOfFrames = frames = 1
        return _decode(ds, policy, path, frames)
    except PermanentError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # a Rust decoder's panic is a BaseException (pyo3)
        # The type only (a decoder's message may quote header values); out of memory by name.
        kind = "out of memory" if isinstance(exc, MemoryError) else type(exc).__name__
        raise PermanentError(f"cannot decode {path} ({transfer_syntax}): {kind}") from exc


def _decode(ds: Dataset, policy: FramePolicy, path: Path, frames: int) -> list[tuple[int, np.ndarray]]:
    """Decode the frames *policy* selects, *frames* being the count the IOD allows."""
    if policy in ("all", "max_variance") and frames > 1:
        stack = pixel_array(ds)
        for frame in stack:
            _check_frame_shape(frame, ds, path)
        decoded = [(i, to_display(stack[i], ds, i)) for i in range(frames)]
        if policy == "all":
            return decoded
        return [max(decoded, key=lambda item: float(item[1].var()))]
    index = frames // 2 if policy == "middle" else 0
    stored = pixel_array(ds, index=index if frames > 1 else None)
    _check_frame_shape(stored, ds, path)
    return [(index, to_display(stored, ds, index))]


def _check_frame_shape(stored: np.ndarray, ds: Dataset, path: Path) -> None:
    """Refuse a decoded frame whose shape disagrees with Rows, Columns and Samples per Pixel.

    Lenient decoders return whatever the bytes allow when the header understates the data.
    """
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    expected = (rows, columns) + ((samples,) if samples > 1 else ())
    if stored.shape != expected:
        raise PermanentError(f"{path}: decoded frame has shape {stored.shape}, the header says {expected}")


def to_display(stored: np.ndarray, ds: Dataset, frame_index: int = 0) -> np.ndarray:
    """Turn one decoded frame into a display-ready ``uint8`` image.

    Grey: Modality LUT, then the VOI LUT (preferred) or the first window, else min-max over the
    frame's range of values; MONOCHROME1 is inverted.  Colour: PALETTE COLOR through its LUT; RGB
    (YBR is already converted by pydicom) scaled by Bits Stored.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _scale_to_uint8(rgb.astype(np.float32) / float(2**bits - 1))
    if stored.ndim == 3:
        if stored.dtype == np.uint8:
            return np.ascontiguousarray(stored)
        bits = int(ds.get("BitsStored", 8 * stored.dtype.itemsize))
        return _scale_to_uint8(stored.astype(np.float32) / float(2**bits - 1))
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        # Each grey step depends on the stored value alone: transform every value in the image's
        # range once and index, instead of pushing a full-field image through float64 (10x faster).
        low, high = int(stored.min()), int(stored.max())
        table = _grey_to_display(np.arange(low, high + 1).astype(stored.dtype), ds, frame_index)
        if stored.dtype.kind == "u":
            return np.concatenate([np.zeros(low, np.uint8), table])[stored]
        return table[stored.astype(np.int32) - low]
    return _grey_to_display(stored, ds, frame_index)


def _grey_to_display(stored: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    display = _voi(_modality_lut(stored, ds, frame_index), ds, frame_index)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 1.0 - display
    return _scale_to_uint8(display)


def _modality_lut(stored: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    transform = _functional_group_item(ds, frame_index, "PixelValueTransformationSequence")
    values = stored.astype(np.float64)
    if transform is not None and "RescaleSlope" in transform:
        values = values * float(transform.RescaleSlope) + float(transform.get("RescaleIntercept", 0.0))
    return values


def _voi(values: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    """Values after the Modality LUT -> [0, 1] through the VOI LUT, the window, or min-max."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        lut = ds.VOILUTSequence[0]
        data = np.asarray(lut.LUTData, dtype=np.float64)
        # apply_voi indexes the LUT with the rescaled values; it wants integers.
        mapped = apply_voi(np.rint(values).astype(np.int64), ds, 0).astype(np.float64)
        low, high = float(data.min()), float(data.max())
        return np.clip((mapped - low) / (high - low), 0, 1) if high > low else np.zeros_like(mapped)
    source: Dataset | None = ds if "WindowCenter" in ds and "WindowWidth" in ds else None
    if source is None:
        source = _functional_group_item(ds, frame_index, "FrameVOILUTSequence")
    if source is not None and "WindowCenter" in source and "WindowWidth" in source:
        center = _first(source.WindowCenter)
        width = _first(source.WindowWidth)
        function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if width > 0:
            return window(values, center, width, function)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _first(value: Any) -> float:
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a VOI window (PS3.3 C.11.2.1.2) with output in [0, 1].

    :param function: ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID`` (VOI LUT Function).
    """
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR needs width >= 1; width 1 is a threshold at the centre
        return (values >= center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _scale_to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


# -------------------------------------------------------------------------
# Image operations (source geometry)
# -------------------------------------------------------------------------


def to_grey(image: np.ndarray) -> np.ndarray:
    """RGB -> grey with ITU-R BT.601 luma; grey images are returned as they are."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def apply_clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV); RGB is equalised on L of Lab."""
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    if image.ndim == 2:
        return clahe.apply(image)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _thumbnail(image: np.ndarray, longest: int = 256) -> tuple[np.ndarray, int]:
    # Subsampling is enough for thresholding and much cheaper than a proper resize.
    step = max(1, math.ceil(max(image.shape[:2]) / longest))
    return to_grey(image)[::step, ::step], step


def breast_bbox(image: np.ndarray, margin: float = 0.01) -> tuple[int, int, int, int]:
    """The breast's bounding box (top, left, height, width): foreground, largest component.

    The foreground threshold is the foot of the background's histogram peak (the triangle method),
    but at least a fifth of Otsu's threshold so that noise in the background stays out.  Otsu's
    threshold alone splits the breast's own fat from its dense tissue wherever the window spreads
    the tissue widely, and cut off the darker periphery, lesions included.  Labels and markers are
    separate, smaller components and fall outside the box.  An image with no clear foreground gives
    the whole image.
    """
    rows, cols = image.shape[:2]
    small, step = _thumbnail(image)
    otsu, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    triangle, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_TRIANGLE)
    _, mask = cv2.threshold(small, max(triangle, 0.2 * otsu), 255, cv2.THRESH_BINARY)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, _labels, stats, _centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return (0, 0, rows, cols)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = (int(v) for v in stats[largest])
    if area < 0.01 * small.size:
        return (0, 0, rows, cols)
    pad_r, pad_c = int(margin * rows), int(margin * cols)
    top, left = max(0, y * step - pad_r), max(0, x * step - pad_c)
    bottom, right = min(rows, (y + h) * step + pad_r), min(cols, (x + w) * step + pad_c)
    return (top, left, bottom - top, right - left)


def content_bbox(image: np.ndarray, threshold: int = 10) -> tuple[int, int, int, int]:
    """Bounding box (top, left, height, width) of pixels brighter than *threshold*; all if none."""
    grey = to_grey(image)
    rows_on = np.flatnonzero((grey > threshold).any(axis=1))
    cols_on = np.flatnonzero((grey > threshold).any(axis=0))
    if rows_on.size == 0:
        return (0, 0, grey.shape[0], grey.shape[1])
    return (
        int(rows_on[0]),
        int(cols_on[0]),
        int(rows_on[-1] - rows_on[0] + 1),
        int(cols_on[-1] - cols_on[0] + 1),
    )


def crop_box(image: np.ndarray, ref: ImageRef, mode: CropMode) -> tuple[int, int, int, int]:
    """The crop of *image* to feed the model.

    :param mode: ``none`` (whole image), ``breast`` (:func:`breast_bbox`) or ``ultrasound`` (the
        header's ultrasound region, else :func:`content_bbox`).
    """
    rows, cols = image.shape[:2]
    if mode == "none":
        return (0, 0, rows, cols)
    if mode == "breast":
        return breast_bbox(image)
    if mode == "ultrasound":
        if ref.us_region is not None:
            top, left, height, width = ref.us_region
            top, left = min(max(top, 0), rows - 1), min(max(left, 0), cols - 1)
            return (top, left, min(height, rows - top), min(width, cols - left))
        return content_bbox(image)
    raise ValueError(f"crop mode {mode!r} is not one of {', '.join(CROP_MODES)}")


def chest_wall_on_right(image: np.ndarray, crop: tuple[int, int, int, int] | None = None) -> bool:
    """True when the breast lies against the right edge (a right breast as normally displayed).

    Mirroring such images puts every chest wall on the left edge, as a left breast is displayed.
    The pixels decide, not the header: ImageLaterality says which breast, not which way it faces.
    """
    top, left, height, width = crop or (0, 0, *image.shape[:2])
    small, _ = _thumbnail(image[top : top + height, left : left + width])
    half = small.shape[1] // 2
    return float(small[:, small.shape[1] - half :].sum()) > float(small[:, :half].sum())


# -------------------------------------------------------------------------
# Letterbox and its inverse
# -------------------------------------------------------------------------


def _content_shape(
    height: int, width: int, output_shape: tuple[int, int], keep_aspect: bool
) -> tuple[int, int]:
    out_h, out_w = output_shape
    if not keep_aspect:
        return out_h, out_w
    scale = min(out_h / height, out_w / width)
    return max(1, min(out_h, round(height * scale))), max(1, min(out_w, round(width * scale)))


def letterbox(
    image: np.ndarray,
    output_shape: tuple[int, int],
    *,
    crop: tuple[int, int, int, int] | None = None,
    flip: bool = False,
    keep_aspect: bool = True,
) -> tuple[np.ndarray, Letterbox]:
    """Crop, optionally mirror, resize (aspect kept) and zero-pad *image* to *output_shape*.

    Downscaling averages (``INTER_AREA``), upscaling is bilinear.  The content is centred; the
    padding is 0.

    :param image: ``(rows, cols)`` or ``(rows, cols, 3)`` ``uint8``.
    :param output_shape: (height, width) of the model input.
    :param crop: (top, left, height, width) to take from *image*; the whole image by default.
    :param flip: Mirror left-right (laterality normalisation).
    :param keep_aspect: False stretches the crop to fill the output (no padding).
    :returns: The resized image and the :class:`Letterbox` that inverts it.
    """
    rows, cols = image.shape[:2]
    top, left, height, width = crop or (0, 0, rows, cols)
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > rows or left + width > cols:
        raise ValueError(f"crop {(top, left, height, width)} does not fit an image of {rows}x{cols}")
    out_h, out_w = output_shape
    content_h, content_w = _content_shape(height, width, output_shape, keep_aspect)
    # Shrinking by an exact integer factor first keeps INTER_AREA on OpenCV's fast path (10x faster
    # on a full-field mammogram).  That needs the crop to be a multiple of the factor, so it is
    # trimmed evenly by fewer than factor pixels; the Letterbox records the trimmed crop, so the
    # inverse stays exact.
    factor_y, factor_x = max(1, height // content_h), max(1, width // content_w)
    if factor_y > 1 or factor_x > 1:
        extra_y, extra_x = height % factor_y, width % factor_x
        top, left = top + extra_y // 2, left + extra_x // 2
        height, width = height - extra_y, width - extra_x
        content_h, content_w = _content_shape(height, width, output_shape, keep_aspect)
    region = image[top : top + height, left : left + width]
    if factor_y > 1 or factor_x > 1:
        region = cv2.resize(region, (width // factor_x, height // factor_y), interpolation=cv2.INTER_AREA)
    shrinking = content_h < region.shape[0] or content_w < region.shape[1]
    content = cv2.resize(
        region, (content_w, content_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )
    if flip:
        content = content[:, ::-1]
    pad_top, pad_left = (out_h - content_h) // 2, (out_w - content_w) // 2
    output = np.zeros((out_h, out_w, *image.shape[2:]), dtype=image.dtype)
    output[pad_top : pad_top + content_h, pad_left : pad_left + content_w] = content
    scale_x, scale_y = content_w / width, content_h / height
    box = Letterbox(
        source_shape=(rows, cols),
        crop=(top, left, height, width),
        scale=scale_x,
        scale_y=None if scale_y == scale_x else scale_y,
        pad_top=pad_top,
        pad_left=pad_left,
        output_shape=(out_h, out_w),
        flipped=flip,
    )
    return output, box


def map_to_source(heatmap: np.ndarray, box: Letterbox) -> np.ndarray:
    """Map a map over the model input back onto the source image's rows x columns.

    :param heatmap: A 2-D map covering the whole model input at any resolution (e.g. a 7x7
        Grad-CAM grid); it is upsampled bilinearly to the input size first.
    :returns: ``float32`` of ``box.source_shape``; zero outside the crop.
    """
    out_h, out_w = box.output_shape
    grid = np.asarray(heatmap, dtype=np.float32)
    if grid.shape != (out_h, out_w):
        grid = np.asarray(cv2.resize(grid, (out_w, out_h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    top, left, height, width = box.crop
    content_w = round(width * box.scale)
    content_h = round(height * (box.scale if box.scale_y is None else box.scale_y))
    content = grid[box.pad_top : box.pad_top + content_h, box.pad_left : box.pad_left + content_w]
    if box.flipped:
        content = content[:, ::-1]
    if min(height, width, *content.shape) > 0 and (content.shape[0] > height or content.shape[1] > width):
        # Shrinking onto a source smaller than the model input: each source pixel keeps the largest value it
        # covers (a grey dilation first), or a sparse map (LEM's back-propagated extrema) vanishes between the
        # pixels a plain resize samples.
        kernel = np.ones((-(-content.shape[0] // height), -(-content.shape[1] // width)), dtype=np.uint8)
        content = np.asarray(cv2.dilate(np.ascontiguousarray(content), kernel), dtype=np.float32)
    output = np.zeros(box.source_shape, dtype=np.float32)
    # Resizing straight into the crop's window of the output saves a copy of a full-field map.
    window = output[top : top + height, left : left + width]
    resized = cv2.resize(
        np.ascontiguousarray(content), (width, height), dst=window, interpolation=cv2.INTER_LINEAR
    )
    if not np.shares_memory(resized, output):  # OpenCV may allocate instead of writing in place
        window[...] = resized
    return output
