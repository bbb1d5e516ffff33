"""Decoding real-world DICOM and the letterbox round trip (plugins.preprocess)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from gateway.errors import PermanentError
from plugins import preprocess as pre
from plugins.types import Letterbox
from tests.plugin_fixtures.dicom import (
    BREAST_TOMOSYNTHESIS,
    SQRT_LUT,
    mammogram_pixels,
    write_mammogram,
    write_ultrasound,
)

# pydicom's bundled test files; get_testdata_file() would try to download the ones not bundled.
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def bundled(name: str) -> Path:
    found = sorted(TEST_FILES.rglob(name))
    if not found:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return found[0]


def decode_one(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some test files carry deliberately odd headers
        [(_, image)] = pre.decode_frames(path, "first")
    return image


# -------------------------------------------------------------------------
# Transfer syntaxes and photometric interpretations
# -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_implicit.dcm",  # Implicit VR Little Endian
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    ],
)
def test_lossless_encodings_decode_to_the_same_display_image(name: str) -> None:
    reference = decode_one(bundled("MR_small.dcm"))
    image = decode_one(bundled(name))
    assert image.dtype == np.uint8 and image.shape == (64, 64)
    np.testing.assert_array_equal(image, reference)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("JPGExtended.dcm", (1024, 256)),  # JPEG Extended 12-bit
        ("JPEG2000.dcm", (1024, 256)),  # JPEG 2000 (lossy allowed)
        ("693_J2KI.dcm", (512, 512)),
        ("JPEGLSNearLossless_16.dcm", (50, 10)),  # JPEG-LS near-lossless
        ("image_dfl.dcm", (512, 512)),  # Deflated Explicit VR Little Endian
        ("CT_small.dcm", (128, 128)),  # signed values through the Modality LUT
    ],
)
def test_grey_encodings_decode_to_full_range_uint8(name: str, shape: tuple[int, int]) -> None:
    image = decode_one(bundled(name))
    assert image.shape == shape and image.dtype == np.uint8
    assert image.max() > image.min()


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG baseline, YBR_FULL
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # JPEG baseline, YBR_FULL_422
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, RGB
        "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
        "SC_rgb_rle_16bit.dcm",  # 16-bit RGB
        "SC_rgb_gdcm_KY.dcm",  # JPEG 2000 RGB
        "SC_rgb_jls_lossy_sample.dcm",  # JPEG-LS RGB
    ],
)
def test_colour_encodings_become_the_same_rgb(name: str) -> None:
    # Every file encodes the same colour bars; lossy ones may differ by a few levels.
    reference = decode_one(bundled("SC_rgb_rle.dcm")).astype(int)
    image = decode_one(bundled(name))
    assert image.shape == (100, 100, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - reference).mean() < 3


def test_big_endian_rgb() -> None:
    image = decode_one(bundled("ExplVR_BigEnd.dcm"))
    assert image.shape == (60, 80, 3) and image.dtype == np.uint8


def test_palette_colour_becomes_rgb() -> None:
    image = decode_one(bundled("examples_palette.dcm"))
    assert image.shape == (350, 800, 3)
    assert not np.array_equal(image[..., 0], image[..., 2])  # a real colour map, not grey


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    # The same anatomy stored inverted as MONOCHROME1 displays identically to MONOCHROME2.
    mono2 = decode_one(write_mammogram(tmp_path / "m2.dcm"))
    mono1 = decode_one(write_mammogram(tmp_path / "m1.dcm", photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono1, mono2)
    assert mono2[:, :20].mean() > mono2[:, -20:].mean()  # tissue bright at the chest wall


def test_real_monochrome1_file_decodes() -> None:
    path = bundled("6278")
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    assert decode_one(path).shape == (16, 16)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_mammogram_matches_uncompressed(tmp_path: Path, syntax: str) -> None:
    native = decode_one(write_mammogram(tmp_path / "native.dcm"))
    compressed = decode_one(write_mammogram(tmp_path / "compressed.dcm", transfer_syntax=syntax))
    np.testing.assert_array_equal(compressed, native)


def test_window_and_min_max(tmp_path: Path) -> None:
    windowed = decode_one(write_mammogram(tmp_path / "w.dcm"))
    stretched = decode_one(write_mammogram(tmp_path / "n.dcm", window=False))
    # Window 2048/4096 maps 0..4095 to 0..255; without a window min-max stretches the data range.
    assert stretched.min() == 0 and stretched.max() == 255
    assert windowed.min() > 0 or windowed.max() < 255


def test_voi_lut_sequence_is_applied(tmp_path: Path) -> None:
    path = write_mammogram(tmp_path / "lut.dcm", voi_lut=True)
    stored = pydicom.dcmread(path).pixel_array
    expected = np.rint(SQRT_LUT[stored] / 4095 * 255)
    np.testing.assert_allclose(decode_one(path), expected, atol=1)


def test_window_functions() -> None:
    values = np.array([0.0, 1000.0, 2000.0, 3000.0, 4000.0])
    linear = pre.window(values, 2000, 2000)
    assert linear[0] == 0 and linear[-1] == 1 and linear[2] == pytest.approx(0.5, abs=1e-3)
    assert pre.window(values, 2000, 2000, "LINEAR_EXACT")[2] == 0.5
    sigmoid = pre.window(values, 2000, 2000, "SIGMOID")
    assert np.all(np.diff(sigmoid) > 0) and sigmoid[2] == 0.5


def test_undecodable_file_raises_permanent_error_naming_it(tmp_path: Path) -> None:
    # A real file none of the installed decoders can read (12-bit lossy JPEG with a bad scan).
    path = bundled("JPEG-lossy.dcm")
    with pytest.raises(PermanentError, match=r"JPEG-lossy\.dcm"):
        decode_one(path)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(PermanentError, match=r"junk\.dcm"):
        pre.decode_frames(junk)
    with pytest.raises(PermanentError, match=r"junk\.dcm"):
        pre.read_image_ref(junk)


# -------------------------------------------------------------------------
# Header and frames
# -------------------------------------------------------------------------


def test_read_image_ref_reads_the_header(tmp_path: Path) -> None:
    path = write_mammogram(tmp_path / "r.dcm", laterality="R", view="MLO")
    ref = pre.read_image_ref(path)
    assert (ref.modality, ref.laterality, ref.view) == ("MG", "R", "MLO")
    assert ref.sop_class_uid == pre.MG_FOR_PRESENTATION
    assert ref.presentation_intent == "FOR PRESENTATION" and ref.number_of_frames == 1
    assert ref.study_instance_uid and ref.sop_instance_uid and ref.path == path


def test_frame_policies(tmp_path: Path) -> None:
    path = write_mammogram(tmp_path / "dbt.dcm", sop_class=BREAST_TOMOSYNTHESIS, frames=3)
    assert pre.read_image_ref(path).number_of_frames == 3
    assert [i for i, _ in pre.decode_frames(path, "first")] == [0]
    assert [i for i, _ in pre.decode_frames(path, "middle")] == [1]
    assert [i for i, _ in pre.decode_frames(path, "all")] == [0, 1, 2]
    us = write_ultrasound(tmp_path / "us.dcm")
    assert [i for i, _ in pre.decode_frames(us, "max_variance")] == [2]  # the fixture's busiest frame
    with pytest.raises(ValueError, match="frame policy"):
        pre.decode_frames(path, "random")  # type: ignore[arg-type]


def test_real_multiframe_ybr_jpeg() -> None:
    frames = pre.decode_frames(bundled("examples_ybr_color.dcm"), "middle")
    assert [i for i, _ in frames] == [15] and frames[0][1].shape == (240, 320, 3)


def test_ultrasound_region_crop(tmp_path: Path) -> None:
    path = write_ultrasound(tmp_path / "us.dcm", region=(20, 30, 80, 100))
    ref = pre.read_image_ref(path)
    assert ref.us_region == (20, 30, 80, 100)
    [(_, image)] = pre.decode_frames(path, "first")
    assert pre.crop_box(image, ref, "ultrasound") == (20, 30, 80, 100)
    # Without the header's region the fallback is the non-black content: region and burnt-in text.
    headerless = dataclasses.replace(ref, us_region=None)
    assert pre.crop_box(image, headerless, "ultrasound") == (2, 2, 98, 128)


# -------------------------------------------------------------------------
# Mammogram crop, laterality and CLAHE
# -------------------------------------------------------------------------


def test_breast_bbox_excludes_background_and_marker() -> None:
    image = (mammogram_pixels(400, 300) >> 4).astype(np.uint8)
    top, left, height, width = pre.breast_bbox(image)
    # The half-ellipse spans 0.7 * cols from the chest wall and 0.84 * rows around the middle.
    assert left == 0 and width == pytest.approx(0.7 * 300, abs=12)
    assert top == pytest.approx(0.08 * 400, abs=12) and height == pytest.approx(0.84 * 400, abs=16)
    assert left + width < 300 - 300 // 6  # the lead marker (columns 250-275) is not the breast


@pytest.mark.parametrize("view", ["CC", "MLO"])
@pytest.mark.parametrize("seed", range(100, 112))
def test_breast_bbox_keeps_the_dark_periphery_and_its_lesion(seed: int, view: str) -> None:
    # Windowed to the breast's own range, fatty periphery is dark next to dense tissue and a bright
    # pectoral muscle; a threshold between fat and dense tissue cut it off, and the lesion with it
    # (MLO of seed 104 here, among others).
    from plugins.synthetic import make_mg_image

    phantom = make_mg_image(seed, birads=3, view=view, laterality="LR"[seed % 2])
    image = pre.to_display(phantom.dataset.pixel_array, phantom.dataset)
    top, left, height, width = pre.breast_bbox(image)
    rows, cols = np.nonzero(phantom.dataset.pixel_array > 100)  # all tissue, however faint
    assert top <= rows.min() + 2 and top + height >= rows.max() - 2
    assert left <= cols.min() + 2 and left + width >= cols.max() - 2
    assert height * width <= 1.1 * (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # and not the background
    lesion_rows, lesion_cols = np.nonzero(phantom.mask)
    assert top <= lesion_rows.min() and lesion_rows.max() < top + height
    assert left <= lesion_cols.min() and lesion_cols.max() < left + width


def test_chest_wall_detection_and_flip_round_trip() -> None:
    left_breast = (mammogram_pixels(200, 160, "left") >> 4).astype(np.uint8)
    right_breast = (mammogram_pixels(200, 160, "right") >> 4).astype(np.uint8)
    assert not pre.chest_wall_on_right(left_breast)
    assert pre.chest_wall_on_right(right_breast)
    boxed, box = pre.letterbox(right_breast, (224, 224), flip=True)
    assert box.flipped
    # Mirrored, the right breast looks like a left one...
    reference, _ = pre.letterbox(left_breast, (224, 224))
    np.testing.assert_array_equal(boxed, reference)
    # ...and its map maps back un-mirrored: a map that is bright where the chest wall is in the
    # model input (left) is bright at the source's right edge.
    grid = np.zeros((224, 224), np.float32)
    grid[:, box.pad_left : box.pad_left + 20] = 1
    back = pre.map_to_source(grid, box)
    assert back[:, -10:].mean() > 0.9 and back[:, :10].mean() < 0.01


def test_clahe_raises_local_contrast() -> None:
    image = (mammogram_pixels(128, 128) >> 5).astype(np.uint8)  # a dim, low-contrast image
    equalised = pre.apply_clahe(image, clip_limit=2.0, tile_grid=4)
    assert equalised.shape == image.shape and equalised.dtype == np.uint8
    assert equalised.std() > image.std()
    rgb = pre.apply_clahe(np.repeat(image[..., None], 3, axis=2))
    assert rgb.shape == (128, 128, 3)


# -------------------------------------------------------------------------
# Letterbox and its inverse
# -------------------------------------------------------------------------


def test_letterbox_oracle_100_by_300() -> None:
    # Spec oracle 7: 100x300 -> 224x224 with 75x224 content centred vertically, zero borders.
    image = np.full((100, 300), 200, np.uint8)
    boxed, box = pre.letterbox(image, (224, 224))
    rows = np.flatnonzero(boxed.any(axis=1))
    assert boxed.shape == (224, 224)
    assert rows.size == pytest.approx(75, abs=1) and box.pad_left == 0
    assert rows[0] == box.pad_top and abs(box.pad_top - (224 - rows[-1] - 1)) <= 1
    assert np.all(boxed[: rows[0]] == 0) and np.all(boxed[rows[-1] + 1 :] == 0)
    zeros, _ = pre.letterbox(np.zeros((100, 300), np.uint8), (224, 224))
    assert not zeros.any()


@pytest.mark.parametrize(
    ("shape", "crop", "flip", "keep_aspect"),
    [
        ((100, 300), None, False, True),
        ((3328, 2560), None, False, True),  # full-field mammogram: trimmed for the fast path
        ((1000, 700), (100, 50, 800, 500), True, True),
        ((480, 640), (40, 60, 300, 400), False, False),  # stretched (no letterbox)
    ],
)
def test_inverse_maps_points_back_exactly(
    shape: tuple[int, int], crop: tuple[int, int, int, int] | None, flip: bool, keep_aspect: bool
) -> None:
    image = np.zeros(shape, np.uint8)
    _, box = pre.letterbox(image, (224, 224), crop=crop, flip=flip, keep_aspect=keep_aspect)
    top, left, height, width = box.crop
    content_h = round(height * (box.scale_y or box.scale))
    content_w = round(width * box.scale)
    # The corners of the content map exactly onto the corners of the (trimmed) crop.
    x0, x1 = (left + width, left) if flip else (left, left + width)
    assert box.to_source(box.pad_left, box.pad_top) == pytest.approx((x0, top))
    assert box.to_source(box.pad_left + content_w, box.pad_top + content_h) == pytest.approx(
        (x1, top + height)
    )
    assert abs(height - (crop or (0, 0, *shape))[2]) < max(shape) / 224  # trimming stays below one factor
    # A known point: forward by the documented formula, then back.
    sx, sy = left + 0.3 * width, top + 0.6 * height
    u = (left + width - sx if flip else sx - left) * box.scale + box.pad_left
    v = (sy - top) * (box.scale_y or box.scale) + box.pad_top
    assert box.to_source(u, v) == pytest.approx((sx, sy))


def test_letterbox_content_lands_where_the_inverse_says() -> None:
    image = np.zeros((300, 500), np.uint8)
    image[100:110, 350:360] = 255  # a bright square centred at (355, 105)
    boxed, box = pre.letterbox(image, (224, 224))
    ys, xs = np.nonzero(boxed > 64)
    centre = box.to_source(xs.mean() + 0.5, ys.mean() + 0.5)
    assert centre == pytest.approx((355, 105), abs=1.0)


def test_map_to_source_has_source_geometry() -> None:
    image = np.zeros((640, 480), np.uint8)
    _, box = pre.letterbox(image, (224, 224), crop=(40, 20, 500, 400))
    grid = np.zeros((7, 7), np.float32)
    grid[3, 3] = 1.0
    back = pre.map_to_source(grid, box)
    assert back.shape == (640, 480) and back.dtype == np.float32
    assert not back[:40].any() and not back[:, :20].any()  # outside the crop stays 0
    peak_y, peak_x = np.unravel_index(np.argmax(back), back.shape)
    # The grid's centre cell is the input's centre, which is the crop's centre.
    expected = box.to_source(112, 112)
    assert (peak_x, peak_y) == pytest.approx(expected, abs=box.crop[2] / 7 / 2)


def test_letterbox_rejects_a_crop_outside_the_image() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pre.letterbox(np.zeros((10, 10), np.uint8), (8, 8), crop=(5, 5, 10, 10))


def test_letterbox_dataclass_default_inverse() -> None:
    box = Letterbox(
        source_shape=(10, 20), crop=(0, 0, 10, 20), scale=2.0, pad_top=5, pad_left=0, output_shape=(30, 40)
    )
    assert box.to_source(0, 5) == (0, 0) and box.to_source(40, 25) == (20, 10)


def test_read_image_ref_of_a_deflated_bomb_holds_only_its_header(tmp_path: Path) -> None:
    """The worker learns an image's header without inflating the whole data set (pydicom would)."""
    import tracemalloc

    from tests.test_edge_receive import deflated_bomb

    bomb = deflated_bomb(tmp_path / "bomb.dcm", 256 * 2**20)
    tracemalloc.start()
    try:
        ref = pre.read_image_ref(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ref.modality == "CT" and ref.sop_instance_uid
    assert peak < 32 * 2**20, f"reading the header held {peak / 2**20:.0f} MiB"
