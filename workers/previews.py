"""PNG previews of the heatmap Secondary Captures, written by the worker beside each one.

The web service shows these files and never decodes DICOM pixel data itself: a data set it
parsed could be any size and any encoding, and its process has no memory budget of its own.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom


def preview_path(dicom_path: str | Path) -> Path:
    """Where the preview of the object at *dicom_path* lives (beside it, same stem)."""
    return Path(dicom_path).with_suffix(".png")


def write_preview(dataset: pydicom.Dataset, dicom_path: Path) -> Path | None:
    """Write the first frame of an uncompressed 8-bit RGB object we built as a PNG beside it.

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
    if int(dataset.get("PlanarConfiguration", 0) or 0) == 1:
        rgb = frame.reshape(3, rows, columns).transpose(1, 2, 0)
    else:
        rgb = frame.reshape(rows, columns, 3)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("OpenCV could not encode the preview as PNG")
    path = preview_path(dicom_path)
    temp = path.with_suffix(".png.tmp")
    temp.write_bytes(encoded.tobytes())
    temp.replace(path)
    return path
