"""Header reads that never inflate or load a whole data set.

pydicom inflates a Deflated Explicit VR Little Endian data set whole before it parses anything,
even with ``stop_before_pixels``: a 1 MB deflated object that inflates to 1 GiB costs 1 GiB of
memory in every process that only wants its header.  Here the deflated stream is inflated in
steps, counted against a budget, and only its first bytes (where the header is) are kept.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

#: The default inflated-size budget: the largest object we accept (a multi-frame tomosynthesis
#: or an uncompressed breast CT runs to a few GB; 4 GiB is the most a 32-bit length can describe).
DEFAULT_INFLATE_BUDGET = 4 * 2**30
#: The inflated bytes kept for the header; a header longer than this is not one we can read.
HEADER_BUDGET = 8 * 2**20
#: Compressed bytes read, and inflated bytes produced, per step.
_STEP = 1 << 20
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_PREAMBLE_AND_PREFIX = 132


class InflateBudgetExceeded(ValueError):
    """The deflated data set inflates to more than the budget allows."""


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file: after the preamble and the file meta group.

    :raises ValueError: if the file has no DICM prefix or no File Meta Information Group Length.
    """
    with Path(path).open("rb") as f:
        head = f.read(_PREAMBLE_AND_PREFIX + 12)
    if len(head) < _PREAMBLE_AND_PREFIX + 12 or head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    group, element, vr, length = struct.unpack_from("<HH2sH", head, _PREAMBLE_AND_PREFIX)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise ValueError("the file meta group has no group length")
    (group_length,) = struct.unpack_from("<L", head, _PREAMBLE_AND_PREFIX + 8)
    return _PREAMBLE_AND_PREFIX + 12 + group_length


def inflated_prefix(path: Path, offset: int, budget: int, keep: int = HEADER_BUDGET) -> bytes:
    """Inflate the raw-deflate stream from *offset* in *path* step by step and return its first *keep* bytes.

    The whole stream is inflated (and thrown away past *keep*) to learn its size: memory stays at
    a few MiB whatever the stream inflates to.

    :raises InflateBudgetExceeded: as soon as more than *budget* bytes have come out.
    :raises zlib.error: if the stream is not valid deflate data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    total = 0
    with Path(path).open("rb") as f:
        f.seek(offset)
        pending = b""
        while True:
            if not pending:
                pending = f.read(_STEP)
                if not pending:
                    break
            out = inflater.decompress(pending, _STEP)
            pending = inflater.unconsumed_tail
            total += len(out)
            if total > budget:
                raise InflateBudgetExceeded(f"the data set inflates to more than {budget} bytes")
            if len(kept) < keep:
                kept += out[: keep - len(kept)]
            if inflater.eof:
                break
    return bytes(kept)


def _before_pixels(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) in _PIXEL_DATA_TAGS


def read_header(path: Path | str, inflate_budget: int = DEFAULT_INFLATE_BUDGET) -> Dataset:
    """The header of a Part 10 file (everything before the pixel data), with its ``file_meta``.

    Never reads the pixel data, and never holds an inflated data set whole: a deflated one is
    inflated as a stream under *inflate_budget* (see :func:`inflated_prefix`).

    :raises InflateBudgetExceeded: if a deflated data set inflates to more than the budget.
    :raises Exception: whatever pydicom raises for bytes it cannot decode.
    """
    path = Path(path)
    meta = read_file_meta_info(path)
    if str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
        return dcmread(path, stop_before_pixels=True, defer_size="64 KB")
    prefix = inflated_prefix(path, dataset_offset(path), inflate_budget)
    header = read_dataset(
        io.BytesIO(prefix), is_implicit_VR=False, is_little_endian=True, stop_when=_before_pixels
    )
    header.file_meta = meta
    return header
