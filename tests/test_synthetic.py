"""Tests of the synthetic MG/US phantoms: DICOM validity, lesion placement, determinism, data sets on disk."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from plugins import synthetic
from plugins.synthetic import (
    MG_SOP_CLASS_UID,
    US_MULTIFRAME_SOP_CLASS_UID,
    US_SOP_CLASS_UID,
    make_mg_image,
    make_mg_study,
    make_mg_study_phantoms,
    make_us_image,
    write_dataset_dir,
)

SMALL_MG = (160, 128)
SMALL_US = (120, 160)


def _round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _displayed(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels with "brighter means denser/more echo" whatever the photometric interpretation."""
    pixels = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = float((1 << ds.BitsStored) - 1) - pixels
    if pixels.ndim == 3 and ds.SamplesPerPixel == 3:
        pixels = pixels.mean(axis=2)
    return pixels


def _uids(ds: pydicom.Dataset) -> list[str]:
    return [
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
    ]


# ---------------------------------------------------------------------------------------------------------
# Mammography


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_mg_round_trips_with_presentation_headers(photometric: str) -> None:
    phantom = make_mg_image(5, "malignant", SMALL_MG, laterality="R", view="MLO", photometric=photometric)
    ds = _round_trip(phantom.dataset)
    assert ds.SOPClassUID == MG_SOP_CLASS_UID
    assert ds.file_meta.MediaStorageSOPClassUID == MG_SOP_CLASS_UID
    assert ds.Modality == "MG"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.ImageLaterality == "R" and ds.ViewPosition == "MLO"
    view = ds.ViewCodeSequence[0]
    assert (view.CodeValue, view.CodingSchemeDesignator) == ("399368009", "SCT")
    assert ds.PhotometricInterpretation == photometric
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
    assert ds.pixel_array.shape == SMALL_MG and ds.pixel_array.dtype == np.uint16
    np.testing.assert_array_equal(ds.pixel_array, phantom.dataset.pixel_array)
    assert float(ds.WindowWidth) > 0 and len(ds.PixelSpacing) == 2 and len(ds.ImagerPixelSpacing) == 2
    assert str(ds.PatientName).startswith("SYNTH^PATIENT") and ds.PatientID.startswith("SYNTH")
    assert "SYNTHETIC" in ds.ImageComments
    assert all(UID(uid).is_valid for uid in _uids(ds))
    assert len(set(_uids(ds)[:3])) == 3


def test_mg_breast_sits_on_the_chest_wall_side() -> None:
    for laterality in ("L", "R"):
        pixels = _displayed(make_mg_image(2, "normal", SMALL_MG, laterality=laterality).dataset)
        tissue = pixels > 100
        left, right = tissue[:, : SMALL_MG[1] // 2].mean(), tissue[:, SMALL_MG[1] // 2 :].mean()
        assert (left > right) == (laterality == "L")
        # The chest-wall edge is mostly tissue, the far edge mostly background.
        wall = tissue[:, 0] if laterality == "L" else tissue[:, -1]
        assert wall.mean() > 0.6


@pytest.mark.parametrize("label", ["benign", "malignant"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_mg_mask_marks_a_denser_lesion(label: str, photometric: str) -> None:
    for seed in range(3):
        phantom = make_mg_image(
            seed, label, SMALL_MG, view="CC" if seed % 2 else "MLO", photometric=photometric
        )
        pixels = _displayed(phantom.dataset)
        breast = pixels > 100
        assert phantom.mask.shape == pixels.shape and phantom.mask.any()
        assert np.all(breast[phantom.mask]), "the lesion must lie inside the breast"
        inside = pixels[phantom.mask].mean()
        outside = pixels[breast & ~phantom.mask].mean()
        assert inside > outside + 300, f"seed {seed}: lesion {inside:.0f} vs tissue {outside:.0f}"
        row, col = phantom.lesion_center
        assert phantom.mask[round(row), round(col)]


def test_mg_normal_has_an_empty_mask() -> None:
    phantom = make_mg_image(4, "normal", SMALL_MG)
    assert not phantom.mask.any() and phantom.lesion_center is None and phantom.birads == 1


def _compactness(mask: np.ndarray) -> float:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    return 4 * np.pi * cv2.contourArea(contour) / cv2.arcLength(contour, True) ** 2


def test_birads_grades_from_round_to_irregular_and_spiculated() -> None:
    size = (320, 256)
    round_masses, spiculated = [], []
    for seed in range(3):
        grades = {k: make_mg_image(seed, birads=k, size=size) for k in range(1, 6)}
        assert [grades[k].label for k in range(1, 6)] == [f"BI-RADS {k}" for k in range(1, 6)]
        assert not grades[1].mask.any() and all(grades[k].mask.any() for k in range(2, 6))
        round_masses.append(_compactness(grades[2].mask))
        spiculated.append(_compactness(grades[5].mask))
        # The same seed gives the same breast, so subtracting BI-RADS 1 leaves the lesion alone; what it adds
        # just outside its core is the spicules, which grow from none (2) to short (4) to long (5).
        normal = _displayed(grades[1].dataset)
        halo = {}
        for k in (2, 4, 5):
            mask = grades[k].mask
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((31, 31), np.uint8)).astype(bool) & ~mask
            halo[k] = float((_displayed(grades[k].dataset) - normal)[ring].mean())
        assert halo[2] < 40 < halo[4] < halo[5], f"seed {seed}: {halo}"
    assert min(round_masses) > 0.85
    assert np.mean(spiculated) < np.mean(round_masses) - 0.1


def test_ordinal_birads_2_masses_hold_coarse_calcifications() -> None:
    # They set BI-RADS 2 apart from the oval BI-RADS 3 mass; the binary sets' benign mass stays plain.
    size = (320, 256)
    for seed in range(3):
        normal = _displayed(make_mg_image(seed, birads=1, size=size).dataset).astype(np.float64)
        peak_over_median = {}
        for name, phantom in (
            ("BI-RADS 2", make_mg_image(seed, birads=2, size=size)),
            ("BI-RADS 3", make_mg_image(seed, birads=3, size=size)),
            ("benign", make_mg_image(seed, "benign", size=size)),
        ):
            core = (_displayed(phantom.dataset) - normal)[phantom.mask]
            peak_over_median[name] = float(core.max() / np.median(core))
        assert peak_over_median["BI-RADS 2"] > 2.0, peak_over_median
        assert peak_over_median["BI-RADS 3"] < 1.5 and peak_over_median["benign"] < 1.5, peak_over_median


def test_mg_study_has_four_views_and_one_lesion_breast() -> None:
    phantoms = make_mg_study_phantoms(11, "benign", SMALL_MG, lesion_side="R")
    views = {(p.dataset.ImageLaterality, p.dataset.ViewPosition) for p in phantoms}
    assert views == {("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")}
    assert len({p.dataset.StudyInstanceUID for p in phantoms}) == 1
    assert len({p.dataset.PatientID for p in phantoms}) == 1
    assert len({p.dataset.SOPInstanceUID for p in phantoms}) == 4
    for phantom in phantoms:
        lesion_side = phantom.dataset.ImageLaterality == "R"
        assert phantom.mask.any() == lesion_side
        assert phantom.label == ("benign" if lesion_side else "normal")
    datasets = make_mg_study(11, "benign", SMALL_MG, lesion_side="R")
    assert [d.SOPInstanceUID for d in datasets] == [p.dataset.SOPInstanceUID for p in phantoms]
    ordinal = make_mg_study_phantoms(11, birads=4, size=SMALL_MG, lesion_side="L")
    assert sorted(p.label for p in ordinal) == ["BI-RADS 1", "BI-RADS 1", "BI-RADS 4", "BI-RADS 4"]
    assert all(p.mask.any() == (p.birads == 4) for p in ordinal)
    # One lesion seen in two views: the same shape, so a similar area in CC and MLO.
    areas = [int(p.mask.sum()) for p in ordinal if p.birads == 4]
    assert max(areas) < 1.3 * min(areas)


def test_generation_is_deterministic_from_the_seed() -> None:
    first = make_mg_image(21, "malignant", SMALL_MG)
    again = make_mg_image(21, "malignant", SMALL_MG)
    other = make_mg_image(22, "malignant", SMALL_MG)
    assert first.dataset.PixelData == again.dataset.PixelData
    assert _uids(first.dataset) == _uids(again.dataset)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert first.dataset.PixelData != other.dataset.PixelData
    assert first.dataset.SOPInstanceUID != other.dataset.SOPInstanceUID
    us_a, us_b = make_us_image(3, "benign", SMALL_US), make_us_image(3, "benign", SMALL_US)
    assert us_a.dataset.PixelData == us_b.dataset.PixelData and _uids(us_a.dataset) == _uids(us_b.dataset)


def test_full_size_mammogram_is_generated_without_pixel_loops() -> None:
    phantom = make_mg_image(1, "malignant", synthetic.MG_FULL_SIZE, view="MLO")
    assert phantom.dataset.pixel_array.shape == synthetic.MG_FULL_SIZE
    assert float(phantom.dataset.PixelSpacing[0]) == pytest.approx(0.07)
    assert phantom.mask.sum() > 1000


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="laterality"):
        make_mg_image(0, "benign", SMALL_MG, laterality="X")
    with pytest.raises(ValueError, match="label"):
        make_mg_image(0, "suspicious", SMALL_MG)
    with pytest.raises(ValueError, match="BI-RADS"):
        make_mg_image(0, birads=6, size=SMALL_MG)
    with pytest.raises(ValueError, match="size"):
        make_us_image(0, "benign", (10, 10))


# ---------------------------------------------------------------------------------------------------------
# Ultrasound


def _region(ds: pydicom.Dataset) -> tuple[int, int, int, int]:
    item = ds.SequenceOfUltrasoundRegions[0]
    return (
        item.RegionLocationMinY0,
        item.RegionLocationMinX0,
        item.RegionLocationMaxY1,
        item.RegionLocationMaxX1,
    )


def test_us_round_trips_with_a_region_inside_a_black_border() -> None:
    phantom = make_us_image(7, "benign", SMALL_US)
    ds = _round_trip(phantom.dataset)
    assert ds.SOPClassUID == US_SOP_CLASS_UID and ds.Modality == "US"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8
    assert ds.pixel_array.shape == SMALL_US
    assert all(UID(uid).is_valid for uid in _uids(ds))
    top, left, bottom, right = _region(ds)
    assert 0 < top < bottom < SMALL_US[0] - 1 and 0 < left < right < SMALL_US[1] - 1
    item = ds.SequenceOfUltrasoundRegions[0]
    assert item.RegionSpatialFormat == 1 and item.PhysicalUnitsXDirection == 3 and item.PhysicalDeltaX > 0
    pixels = ds.pixel_array
    # Below the image region there is nothing but black border.
    assert not pixels[bottom + 1 :, left : right + 1].any()
    assert pixels[top : bottom + 1, left : right + 1].mean() > 40
    rows, cols = np.nonzero(phantom.mask)
    assert rows.min() >= top and rows.max() <= bottom and cols.min() >= left and cols.max() <= right


@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_us_lesions_are_hypoechoic_with_the_expected_posterior_feature(label: str) -> None:
    differences = []
    for seed in range(4):
        phantom = make_us_image(seed, label, (160, 200), annotations=False)
        pixels = phantom.dataset.pixel_array.astype(np.float64)
        top, left, bottom, right = _region(phantom.dataset)
        region = np.zeros_like(phantom.mask)
        region[top : bottom + 1, left : right + 1] = True
        inside = pixels[phantom.mask].mean()
        outside = pixels[region & ~phantom.mask].mean()
        assert inside < outside - 20, f"seed {seed}: lesion {inside:.0f} vs tissue {outside:.0f}"
        rows, cols = np.nonzero(phantom.mask)
        # A band as tall as the lesion, right behind it, where shadowing and enhancement are strongest.
        below = slice(rows.max() + 3, min(bottom + 1, rows.max() + 3 + (rows.max() - rows.min())))
        core_cols = slice(int(np.percentile(cols, 30)), int(np.percentile(cols, 70)) + 1)
        behind = pixels[below, core_cols].mean()
        width = core_cols.stop - core_cols.start
        side_cols = [
            c for c in range(left, right + 1) if abs(c - cols.mean()) > (cols.max() - cols.min()) / 2 + 4
        ]
        beside = pixels[below][:, side_cols].mean()
        differences.append(behind - beside)
        assert width > 0
    if label == "malignant":
        assert max(differences) < -15, f"no posterior shadow: {differences}"
    else:
        assert min(differences) > 0, f"no posterior enhancement: {differences}"


def test_us_multiframe_and_rgb_variants() -> None:
    phantom = make_us_image(9, "malignant", SMALL_US, frames=3, photometric="RGB")
    ds = _round_trip(phantom.dataset)
    assert ds.SOPClassUID == US_MULTIFRAME_SOP_CLASS_UID
    assert int(ds.NumberOfFrames) == 3 and ds.FrameIncrementPointer == 0x00181063 and float(ds.FrameTime) > 0
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3 and ds.PlanarConfiguration == 0
    frames = ds.pixel_array
    assert frames.shape == (3, *SMALL_US, 3)
    top, left, bottom, right = _region(ds)
    region = frames[:, top : bottom + 1, left : right + 1]
    # Grey image region (equal channels), speckle that changes between frames, one lesion mask for all.
    assert np.array_equal(region[..., 0], region[..., 1])
    assert not np.array_equal(region[0], region[1])
    in_region = np.zeros_like(phantom.mask)
    in_region[top : bottom + 1, left : right + 1] = True
    inside = frames[:, phantom.mask, 0].mean(axis=1)
    outside = frames[:, in_region & ~phantom.mask, 0].mean(axis=1)
    assert np.all(inside < outside - 20)


# ---------------------------------------------------------------------------------------------------------
# Data sets on disk


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_write_dataset_dir_mg(tmp_path: Path) -> None:
    manifest = write_dataset_dir(
        tmp_path / "mg", "mg", 7, seed=3, size=SMALL_MG, classes=("normal", "benign", "malignant")
    )
    rows = _read_manifest(manifest)
    assert len(rows) == 7
    assert list(rows[0]) == ["path", "label", "birads", "patient_id", "mask"]
    assert {r["label"] for r in rows} == {"normal", "benign", "malignant"}
    by_patient: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
        ds = pydicom.dcmread(manifest.parent / row["path"])
        mask = cv2.imread(str(manifest.parent / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == ds.pixel_array.shape and mask.dtype == np.uint8
        assert mask.any() == (row["label"] != "normal")
        assert ds.PatientID == row["patient_id"]
        assert row["birads"] == str(synthetic.BIRADS_OF_LABEL[row["label"]])
    # Two images (CC and MLO of the lesion breast) per patient, one label per patient.
    assert sorted(len(v) for v in by_patient.values()) == [1, 2, 2, 2]
    for images in by_patient.values():
        assert len({r["label"] for r in images}) == 1
        assert len({pydicom.dcmread(manifest.parent / r["path"]).ViewPosition for r in images}) == len(images)
    description = json.loads((manifest.parent / "dataset.json").read_text())
    assert description["kind"] == "mg" and description["n"] == 7 and description["seed"] == 3
    again = write_dataset_dir(
        tmp_path / "mg2", "mg", 7, seed=3, size=SMALL_MG, classes=("normal", "benign", "malignant")
    )
    assert _read_manifest(again) == rows
    assert (again.parent / rows[0]["path"]).read_bytes() == (manifest.parent / rows[0]["path"]).read_bytes()


def test_write_dataset_dir_birads_and_us(tmp_path: Path) -> None:
    birads = _read_manifest(write_dataset_dir(tmp_path / "b", "mg-birads", 10, seed=1, size=SMALL_MG))
    assert {r["label"] for r in birads} == {f"BI-RADS {k}" for k in range(1, 6)}
    assert all(r["label"] == f"BI-RADS {r['birads']}" for r in birads)
    us_manifest = write_dataset_dir(tmp_path / "u", "us", 4, seed=2, size=SMALL_US, us_frames=2)
    rows = _read_manifest(us_manifest)
    assert {r["label"] for r in rows} == {"benign", "malignant"}
    ds = pydicom.dcmread(us_manifest.parent / rows[0]["path"])
    assert ds.SOPClassUID == US_MULTIFRAME_SOP_CLASS_UID and ds.pixel_array.shape == (2, *SMALL_US)
    with pytest.raises(ValueError, match="classes"):
        write_dataset_dir(tmp_path / "x", "mg", 2, seed=0, classes=("BI-RADS 3",))
    with pytest.raises(ValueError, match="images_per_patient"):
        write_dataset_dir(tmp_path / "x", "mg", 2, seed=0, images_per_patient=5)


@pytest.mark.peers
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
def test_dciodvfy_finds_no_errors(tmp_path: Path) -> None:
    datasets = {
        "mg": make_mg_image(1, "malignant", SMALL_MG, view="MLO").dataset,
        "mg1": make_mg_image(1, "benign", SMALL_MG, photometric="MONOCHROME1").dataset,
        "us": make_us_image(1, "benign", SMALL_US).dataset,
        "usmf": make_us_image(1, "malignant", SMALL_US, frames=2, photometric="RGB").dataset,
    }
    for name, ds in datasets.items():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"
