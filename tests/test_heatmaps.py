"""Heatmap Secondary Captures and output labels: what a radiologist and a PACS administrator see.

The map is shown over the image the model saw on one absolute scale, every label keeps the disclaimer, series
numbers tell kinds and models apart, the model's name is the network that ran, demo weights say what they are,
and every SC identifies its algorithm the way IHE AI Results asks.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from plugins.builtin.hybrid_birads import HybridBiradsPlugin
from plugins.builtin.lem import LEMPlugin
from plugins.preprocess import map_to_source
from plugins.types import Letterbox, failure_reason
from tests.test_outputs import make_mammogram, make_prediction, make_ultrasound, round_trip
from workers import identity, outputs

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
LONG_NAME = "CLGB-Net (ResNet-50 + Swin-T + FPN + CAM), normal / benign / malignant"


def _red_pixels(sc: Dataset) -> int:
    """Pixels of the image part the jet map paints warm (red well above blue), caption banner excluded."""
    pixels = sc.pixel_array.astype(int)
    body = pixels[pixels.shape[0] // 4 :, : int(pixels.shape[1] * 0.85)]
    return int(((body[..., 0] > body[..., 2] + 60) & (body[..., 0] > 150)).sum())


def test_the_colour_scale_is_absolute_so_a_benign_image_looks_cold() -> None:
    source = make_mammogram("L", "CC")
    display = np.full((int(source.Rows), int(source.Columns)), 128, dtype=np.uint8)
    # The same per-map-normalised map (hot square at 1.0) on a suspicious and on a benign call.
    suspicious = outputs.build_heatmap_sc(source, display, make_prediction(source, probabilities=(0.1, 0.9)))
    benign = outputs.build_heatmap_sc(source, display, make_prediction(source, probabilities=(0.99, 0.01)))
    assert _red_pixels(suspicious) > 100
    assert _red_pixels(benign) == 0
    values = outputs.heatmap_values(make_prediction(source, probabilities=(0.99, 0.01)))
    assert float(values.max()) == pytest.approx(0.01, abs=1e-6)


def test_the_underlay_is_the_display_image_the_model_saw() -> None:
    """MONOCHROME1 is shown inverted: the decoded underlay is the display rendering, not the stored values."""
    source = make_mammogram("L", "CC")
    inverted = make_mammogram("L", "CC")
    inverted.PhotometricInterpretation = "MONOCHROME1"
    prediction = make_prediction(source, probabilities=(1.0, 0.0))  # risk 0: the map adds no colour
    plain = outputs.build_heatmap_sc(source, None, prediction).pixel_array.astype(int)
    flipped = outputs.build_heatmap_sc(inverted, None, prediction).pixel_array.astype(int)
    rows = slice(plain.shape[0] // 3, plain.shape[0] - 5)
    # The ramp rises in one and falls in the other over the same image part.
    assert plain[rows, 5, 0].mean() != pytest.approx(flipped[rows, 5, 0].mean(), abs=1)
    assert np.corrcoef(plain[rows, 5, 0], flipped[rows, 5, 0])[0, 1] < -0.9


def test_a_sparse_map_larger_than_a_small_image_still_shows() -> None:
    """LEM's map of isolated extrema, shrunk onto an image smaller than the model input, keeps its peaks."""
    display = np.full((60, 50), 128, dtype=np.uint8)
    heat = np.zeros((1024, 832), dtype=np.float32)
    heat[500, 400] = 1.0  # one extremum, between the rows a plain resize would sample
    canvas = outputs.render_heatmap_overlay(display, heat, caption_lines=["NOT FOR DIAGNOSTIC USE"])
    red = (canvas[..., 0].astype(int) > canvas[..., 2].astype(int) + 60).sum()
    assert red > 0


def test_caption_names_view_finding_and_weights_kind() -> None:
    source = make_mammogram("R", "MLO")
    random_weights = make_prediction(source, demo_weights=True)
    phantoms = dataclasses.replace(random_weights, weights_sha256="ab" * 32)
    sc_random = outputs.build_heatmap_sc(source, None, random_weights)
    sc_phantoms = outputs.build_heatmap_sc(source, None, phantoms)
    assert "R MLO" in sc_random.DerivationDescription and "R MLO" in sc_phantoms.DerivationDescription
    assert "random" in sc_random.ImageComments and "UNTRAINED" in sc_random.ImageComments
    assert "synthetic phantoms" in sc_phantoms.ImageComments and "UNTRAINED" not in sc_phantoms.ImageComments
    assert "meaningless" not in sc_phantoms.DerivationDescription
    assert identity.weights_kind(True, "") == "random"
    assert identity.weights_kind(True, "ab") == "phantoms"
    assert identity.weights_kind(False, "ab") == "trained" and identity.weights_notice("trained") == ""


def test_series_descriptions_keep_the_disclaimer_for_any_model_name() -> None:
    for name in ("", "LEM", LONG_NAME, LONG_NAME * 3):
        text = identity.series_description("AI heatmap", name)
        assert text.startswith(identity.DISCLAIMER_LABEL) and len(text) <= 64
    source = make_mammogram("L", "CC")
    sc = outputs.build_heatmap_sc(
        source, None, make_prediction(source), display_name=LONG_NAME, per_model_series=True
    )
    assert sc.SeriesDescription.startswith("NOT FOR DIAGNOSTIC USE") and "CLGB-Net" in sc.SeriesDescription


def test_series_numbers_differ_by_kind_and_by_model() -> None:
    models = [None, "asg_mammonet", "clgb_net", "hybrid_birads", "lem", "us_fusion", "site_model"]
    numbers = [identity.series_number(kind, model) for kind in identity.SERIES_KINDS for model in models]
    assert len(set(numbers)) == len(numbers)
    assert identity.series_number("heatmap", "lem") == identity.series_number("heatmap", "lem")
    source = make_mammogram("L", "CC")
    study = outputs.build_heatmap_sc(source, None, make_prediction(source))
    own = outputs.build_heatmap_sc(source, None, make_prediction(source), per_model_series=True)
    assert study.SeriesNumber == identity.series_number("heatmap")
    assert own.SeriesNumber == identity.series_number("heatmap", "test_model")
    assert study.SeriesInstanceUID != own.SeriesInstanceUID


def test_the_reported_name_is_the_network_that_runs() -> None:
    defaults = dict(HybridBiradsPlugin.default_options)
    display = "Hybrid ResNet-50 + MHSA, BI-RADS 1-5 (Distance-Aware Learning)"
    demo = identity.network_display_name(display, {**defaults, "backbone": "resnet18"}, defaults)
    assert "ResNet-18" in demo and "ResNet-50" not in demo
    assert identity.network_display_name(display, defaults, defaults) == display
    lem_defaults = dict(LEMPlugin.default_options)
    lem = identity.network_display_name(
        "LEM (ResNet-18)", {**lem_defaults, "backbone": "resnet34"}, lem_defaults
    )
    assert "ResNet-34" in lem and "ResNet-18" not in lem


def test_every_sc_carries_the_air_contributing_equipment() -> None:
    source = make_mammogram("L", "CC")
    first = dataclasses.replace(make_prediction(source), weights_sha256="11" * 32)
    retrained = dataclasses.replace(first, weights_sha256="22" * 32)
    items = []
    for prediction in (first, retrained):
        sc = round_trip(outputs.build_heatmap_sc(source, None, prediction))
        # highdicom adds an item for itself (the library that wrote the object); ours is the model's.
        (item,) = [i for i in sc.ContributingEquipmentSequence if i.Manufacturer == identity.MANUFACTURER]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == ("DCM", "109102")
        assert item.Manufacturer == identity.MANUFACTURER
        assert item.ManufacturerModelName and len(item.ManufacturerModelName) <= 64
        assert len(item.SoftwareVersions) == 2
        assert pydicom.uid.UID(item.DeviceUID).is_valid
        items.append(item)
    assert items[0].DeviceUID != items[1].DeviceUID  # retrained: a new device
    again = outputs.build_heatmap_sc(source, None, first).ContributingEquipmentSequence[-1]
    assert again.DeviceUID == items[0].DeviceUID  # deterministic


def test_empty_type_2c_laterality_stays_present_and_empty() -> None:
    source = make_ultrasound(frames=1)
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = US_IMAGE
    del source.NumberOfFrames
    source.PixelData = source.PixelData[: int(source.Rows) * int(source.Columns) * 3]
    source.Laterality = ""
    sc = round_trip(outputs.build_heatmap_sc(source, None, make_prediction(source)))
    assert "Laterality" in sc and sc.Laterality == ""


def test_a_single_frame_object_with_number_of_frames_is_single_frame() -> None:
    source = make_ultrasound(frames=1)
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = US_IMAGE
    source.NumberOfFrames = 2  # says two, holds one: a US Image is single-frame whatever it says
    assert not outputs.is_multiframe(source)
    prediction = make_prediction(source)
    sc = outputs.build_heatmap_sc(source, None, prediction)
    assert "ReferencedFrameNumber" not in sc.SourceImageSequence[0]
    multiframe = make_ultrasound(frames=3)
    assert outputs.is_multiframe(multiframe)
    sc = outputs.build_heatmap_sc(multiframe, None, make_prediction(multiframe, frame_index=2))
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 3


def test_extra_maps_become_scs_of_their_own_when_delivered() -> None:
    source = make_mammogram("L", "CC")
    base = make_prediction(source)
    attention = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.float32)
    prediction = dataclasses.replace(base, extra_maps={"attention": attention, "score_map": attention + 0.5})
    scs = outputs.build_extra_map_scs(source, None, prediction)
    assert len(scs) == 2
    assert {sc.SeriesNumber for sc in scs} == {identity.series_number("extra_map", "test_model")}
    heatmap = outputs.build_heatmap_sc(source, None, prediction)
    assert len({str(sc.SOPInstanceUID) for sc in (*scs, heatmap)}) == 3
    assert all(sc.SeriesDescription.startswith("NOT FOR DIAGNOSTIC USE") for sc in scs)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientBirthDate", "1958-11-23"),
        ("StudyDate", "2026/01/01"),
        ("StudyTime", "25:99"),
        ("PatientSex", "female"),
    ],
)
def test_an_unparseable_type_2_value_is_sent_empty(keyword: str, value: str) -> None:
    source = make_mammogram("L", "CC")
    with pytest.warns(UserWarning):  # pydicom says the value is invalid; the SC is still built
        setattr(source, keyword, value)
    sc = round_trip(outputs.build_heatmap_sc(source, None, make_prediction(source)))
    assert keyword in sc and sc[keyword].value in ("", None)
    assert keyword in sc.DerivationDescription and value not in sc.DerivationDescription
    assert getattr(source, keyword) == value  # the source itself is left alone


def test_a_rejected_header_names_the_attribute_never_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_mammogram("L", "CC")
    source.AccessionNumber = "ACCESSION-NUMBER-WAY-TOO-LONG-4711"

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError(f"bad value {source.AccessionNumber}")

    monkeypatch.setattr(outputs.hd.sc.SCImage, "from_ref_dataset", refuse)
    with pytest.raises(outputs.SourceHeaderError) as raised:
        outputs.build_heatmap_sc(source, None, make_prediction(source))
    reason = failure_reason("building outputs failed", raised.value)
    assert "AccessionNumber" in reason and "4711" not in reason


def test_a_sparse_model_map_survives_the_way_back_to_a_small_source() -> None:
    """LEM's location map (1024x832, isolated extrema) mapped onto a 60x50 image keeps its peak."""
    box = Letterbox(
        source_shape=(60, 50),
        crop=(0, 0, 60, 50),
        scale=832 / 50,
        scale_y=1024 / 60,
        pad_top=0,
        pad_left=0,
        output_shape=(1024, 832),
    )
    heat = np.zeros((1024, 832), dtype=np.float32)
    heat[500, 401] = 1.0
    mapped = map_to_source(heat, box)
    assert mapped.shape == (60, 50) and float(mapped.max()) > 0.9


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_unit_interval_is_nan_to_num_then_clip(dtype: type) -> None:
    """outputs.unit_interval: the values np.clip(np.nan_to_num(x), 0, 1) gives, as float32, NaN and infinities
    included."""
    rng = np.random.default_rng(7)
    values = (rng.standard_normal((257, 311)) * 0.8 + 0.4).astype(dtype)
    for special in (np.nan, np.inf, -np.inf):
        values.flat[rng.integers(0, values.size, 50)] = special
    expected = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0)
    got = outputs.unit_interval(values)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert not np.shares_memory(got, values)


def test_the_overlay_colours_are_opencv_s_jet_map_in_rgb() -> None:
    values = np.concatenate([np.linspace(0.0, 1.0, 1001, dtype=np.float32), np.random.default_rng(3).random(999)])
    grey = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8).reshape(40, 50)
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_JET)
    assert np.array_equal(outputs._jet(values.reshape(40, 50)), bgr[..., ::-1])
