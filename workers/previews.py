"""PNG previews of the heatmap Secondary Captures, written by the worker beside each one.

The web service shows these files and never decodes DICOM pixel data itself: a data set it
parsed could be any size and any encoding, and its process has no memory budget of its own.

A preview is at most :data:`MAX_WIDTH` wide, the width the web page shows: encoding a full-size SC
(1764 x 2492 for a full-field view) as PNG took 0.06 s, two thirds of drawing and writing the SC, for
pixels the page shrank again before showing them.  The SC in the PACS is the full-resolution image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom

#: The widest preview written, in pixels: the width the web page asks for.
MAX_WIDTH = 1024


def preview_path(dicom_path: str | Path) -> Path:
    """Where the preview of the object at *dicom_path* lives (beside it, same stem)."""
    return Path(dicom_path).with_suffix(".png")


def write_preview(dataset: pydicom.Dataset, dicom_path: Path) -> Path | None:
    """Write the first frame of an uncompressed 8-bit RGB object we built as a PNG beside it, shrunk to
    :data:`MAX_WIDTH` when wider.

    Returns the preview's path, or None for anything else (an SR, a grey or compressed image).
    """
    if (
        str(dataset.get("PhotometricInterpretation", "")) != "RGB"
        or int(dataset.get("BitsAllocated", 0) or 0) != 8
        or dataset.file_meta.TransferSyntaxUID.is_compressed
        or "PixelData" not in dataset
    ):
        return None
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    frame = np.frombuffer(dataset.PixelData, dtype=np.uint8, count=rows * columns * 3)
    rgb: np.ndarray
    if int(dataset.get("PlanarConfiguration", 0) or 0) == 1:
        rgb = frame.reshape(3, rows, columns).transpose(1, 2, 0)
    else:
        rgb = frame.reshape(rows, columns, 3)
    if columns > MAX_WIDTH:
        height = max(1, round(rows * MAX_WIDTH / columns))
        rgb = cv2.resize(rgb, (MAX_WIDTH, height), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("OpenCV could not encode the preview as PNG")
    path = preview_path(dicom_path)
    temp = path.with_suffix(".png.tmp")
    temp.write_bytes(encoded.tobytes())
    temp.replace(path)
    return path
