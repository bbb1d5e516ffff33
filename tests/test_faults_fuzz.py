"""Property-based fuzz of the preprocessing with mutated DICOM files: PermanentError or success, nothing else.

Files are mutated two ways: header values replaced by hostile ones (dimensions, bit depths, photometric
interpretation, frame counts, windows, rescale, ultrasound regions, with wrong types and lengths), and raw
bytes flipped or cut after the file meta.  Each mutated file goes through what a worker does with it:
``read_image_ref``, ``decode_frames`` (which applies ``to_display``) under every frame policy, then, for
each image that decoded, every crop mode, the laterality test, grey conversion, CLAHE and ``letterbox``.
Decoding may refuse a file, but only with :class:`~gateway.errors.PermanentError`; whatever it returns
must be a ``uint8`` image the geometric steps accept without any error.

Budget: ``PACS_TRIAGE_FUZZ_EXAMPLES`` examples per template (150 in CI); for a longer run, e.g.
``PACS_TRIAGE_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_faults_fuzz.py``.  The store handler's fuzz
is ``tests/test_gateway_fuzz.py``.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from gateway.errors import PermanentError
from plugins import preprocess as pre
from plugins import synthetic
from tests.utils import make_instance

BUDGET = int(os.environ.get("PACS_TRIAGE_FUZZ_EXAMPLES", "150"))
_SCRATCH = Path(tempfile.mkdtemp(prefix="pacs-triage-fuzz-"))
atexit.register(shutil.rmtree, _SCRATCH, True)


@contextmanager
def _lenient_pydicom() -> Iterator[None]:
    # The suite writes strictly; a fuzzer must be able to write what a broken modality sends.
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom.config.settings.writing_validation_mode = old


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with _lenient_pydicom():
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _templates() -> dict[str, bytes]:
    def mg(rows: int = 24, cols: int = 16) -> Dataset:
        # Fixed UIDs: a byte offset in a mutant then lands on the same byte in every run.
        ds = make_instance(
            modality="MG",
            rows=rows,
            cols=cols,
            seed=3,
            study_uid="1.2.826.0.1.3680043.8.498.1",
            series_uid="1.2.826.0.1.3680043.8.498.1.1",
            sop_uid="1.2.826.0.1.3680043.8.498.1.1.1",
        )
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        return ds

    rle, jpeg_ls, j2k = mg(), mg(), mg(32, 32)
    with _lenient_pydicom():
        rle.compress(RLELossless)
        jpeg_ls.compress(JPEGLSLossless)
        j2k.compress(JPEG2000Lossless)
    us = synthetic.make_us_image(seed=5, label="benign", size=(48, 64), frames=2, photometric="RGB").dataset
    return {
        "mg": _bytes(mg()),
        "mg-rle": _bytes(rle),
        "mg-jpegls": _bytes(jpeg_ls),
        "mg-j2k": _bytes(j2k),
        "us-rgb-multiframe": _bytes(us),
    }


TEMPLATES = _templates()


def _meta_end(data: bytes) -> int:
    # Preamble (128) + "DICM" (4) + (0002,0000) UL element (12) + the group length it holds.
    return 144 + int.from_bytes(data[140:144], "little")


# ------------------------------------------------------------------ strategies

_numbers = st.one_of(
    st.integers(-(2**31), 2**31),
    st.sampled_from([0, 1, -1, 2, 3, 7, 8, 12, 15, 16, 17, 32, 64, 65535, 65536]),
)
_decimals = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-30, 1e30])
)
_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "MONOCHROME1",
            "MONOCHROME2",
            "RGB",
            "PALETTE COLOR",
            "YBR_FULL",
            "YBR_FULL_422",
            "SIGMOID",
            "LINEAR_EXACT",
            "abc",
            "1\\2",
            "-5",
        ]
    ),
)
_value = st.one_of(_numbers, _decimals, _text, st.none(), st.lists(_numbers, max_size=3))

#: Header elements the decode path reads.
_KEYWORDS = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "RescaleSlope",
    "RescaleIntercept",
    "ImageLaterality",
    "ViewPosition",
    "PresentationIntentType",
    "SOPClassUID",
    "Modality",
]

header_mutations = st.lists(st.tuples(st.sampled_from(_KEYWORDS), _value), min_size=1, max_size=4)
region_mutations = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "RegionLocationMinX0",
                "RegionLocationMinY0",
                "RegionLocationMaxX1",
                "RegionLocationMaxY1",
                "RegionSpatialFormat",
            ]
        ),
        _numbers,
    ),
    max_size=3,
)
byte_mutations = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6
)


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    if value is None:
        if keyword in ds:
            del ds[keyword]
        return
    try:
        setattr(ds, keyword, value)
    except Exception:  # pydicom cannot hold it (text in a number); the byte mutations cover such garbage
        pass


def _header_mutant(
    template: bytes, mutations: list[tuple[str, Any]], region: list[tuple[str, int]], pixel_cut: float | None
) -> bytes:
    with _lenient_pydicom():
        ds = pydicom.dcmread(io.BytesIO(template))
        for keyword, value in mutations:
            _set(ds, keyword, value)
        for item in ds.get("SequenceOfUltrasoundRegions", []):
            for keyword, value in region:
                _set(item, keyword, value)
        if pixel_cut is not None and "PixelData" in ds:
            ds.PixelData = ds.PixelData[: int(len(ds.PixelData) * pixel_cut)]
        buffer = io.BytesIO()
        try:
            ds.save_as(buffer, enforce_file_format=True)
        except Exception:  # not writable as a whole: write what a modality would, the raw template
            return template
    return buffer.getvalue()


def _byte_mutant(template: bytes, mutations: list[tuple[float, bytes]], truncate: float | None) -> bytes:
    start = _meta_end(template)
    body = bytearray(template[start:])
    for where, patch in mutations:
        offset = int(where * len(body))
        body[offset : offset + len(patch)] = patch
    if truncate is not None:
        body = body[: int(truncate * len(body))]
    return template[:start] + bytes(body)


mutants = st.one_of(
    st.builds(
        lambda t, m, r, c: _header_mutant(TEMPLATES[t], m, r, c),
        st.sampled_from(sorted(TEMPLATES)),
        header_mutations,
        region_mutations,
        st.one_of(st.none(), st.floats(0, 1)),
    ),
    st.builds(
        lambda t, m, c: _byte_mutant(TEMPLATES[t], m, c),
        st.sampled_from(sorted(TEMPLATES)),
        byte_mutations,
        st.one_of(st.none(), st.floats(0, 1)),
    ),
)


# ------------------------------------------------------------------ the property


def _documented_shape(image: np.ndarray) -> bool:
    """``(rows, cols)`` grey or ``(rows, cols, 3)`` RGB, as decode_frames promises."""
    return image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)


def _check_geometry(image: np.ndarray, ref: Any) -> None:
    """Everything a plugin does to a decoded image must work on any image of the documented shape."""
    assert image.dtype == np.uint8, image.dtype
    assert _documented_shape(image), image.shape
    assert image.shape[0] >= 1 and image.shape[1] >= 1, image.shape
    for mode in pre.CROP_MODES:
        crop = pre.crop_box(image, ref, mode)  # type: ignore[arg-type]
        flip = pre.chest_wall_on_right(image, crop)
        grey = pre.to_grey(image)
        pre.apply_clahe(grey)
        output, box = pre.letterbox(grey, (32, 24), crop=crop, flip=flip)
        assert output.shape == (32, 24) and output.dtype == np.uint8
        back = pre.map_to_source(np.ones((4, 4), np.float32), box)
        assert back.shape == image.shape[:2]


def _run_preprocessing(data: bytes) -> None:
    fd, name = tempfile.mkstemp(suffix=".dcm", dir=_SCRATCH)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            ref = pre.read_image_ref(path)
        except PermanentError:
            return
        assert isinstance(ref.number_of_frames, int)
        for policy in pre.FRAME_POLICIES:
            try:
                frames = pre.decode_frames(path, policy)  # type: ignore[arg-type]
            except PermanentError:
                continue
            assert frames, f"decode_frames({policy}) returned nothing"
            for index, image in frames:
                assert isinstance(index, int)
                assert isinstance(image, np.ndarray)
                _check_geometry(image, ref)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_decode(name: str) -> None:
    """The unmutated templates decode: the fuzz starts from files the pipeline accepts."""
    fd, path = tempfile.mkstemp(suffix=".dcm", dir=_SCRATCH)
    with os.fdopen(fd, "wb") as f:
        f.write(TEMPLATES[name])
    try:
        for _, image in pre.decode_frames(path, "all"):
            _check_geometry(image, pre.read_image_ref(path))
    finally:
        Path(path).unlink()


# Three findings of this fuzz, fixed in plugins/preprocess.py and kept as regression tests.


def test_decoded_shape_follows_the_header() -> None:
    """Rows 1 on a 24 x 16 image: pydicom decoded the extra data as frames and to_display, taking any 3-D
    array for colour, returned a (24, 1, 16) "image"."""
    data = _header_mutant(TEMPLATES["mg"], [("Rows", 1)], [], None)
    fd, path = tempfile.mkstemp(suffix=".dcm", dir=_SCRATCH)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        with pytest.raises(PermanentError):
            pre.decode_frames(path, "middle")
    finally:
        Path(path).unlink()


def test_header_errors_are_permanent_errors() -> None:
    """One byte that makes a VR unknown: pydicom's NotImplementedError escaped read_image_ref, which caught
    only InvalidDicomError, OSError, ValueError and EOFError, and failed a worker's whole study."""
    template = TEMPLATES["mg-j2k"]
    # The second byte of SOP Instance UID's VR ("UI") set to zero, wherever the element lies.
    vr_at = template.index(b"\x08\x00\x18\x00UI") + 5
    data = template[:vr_at] + b"\x00" + template[vr_at + 1 :]
    fd, path = tempfile.mkstemp(suffix=".dcm", dir=_SCRATCH)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        with pytest.raises(PermanentError) as raised:
            pre.read_image_ref(path)
        assert isinstance(raised.value.__cause__, NotImplementedError)
    finally:
        Path(path).unlink()


def test_decoder_panic_is_a_permanent_error() -> None:
    """An RLE frame shorter than Rows x Columns says: pylibjpeg-rle (Rust) panics, and pyo3's
    PanicException is a BaseException that passed every ``except Exception`` up to the worker's task."""
    data = _header_mutant(TEMPLATES["mg-rle"], [("Rows", 1)], [], None)
    fd, path = tempfile.mkstemp(suffix=".dcm", dir=_SCRATCH)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        with pytest.raises(PermanentError):
            pre.decode_frames(path, "middle")
    finally:
        Path(path).unlink()


@settings(max_examples=BUDGET * len(TEMPLATES), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutants)
def test_preprocessing_of_mutated_files_raises_permanent_error_or_succeeds(data: bytes) -> None:
    _run_preprocessing(data)
