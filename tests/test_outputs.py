"""The DICOM writers: TID 1500 SR and heatmap SC from fabricated predictions, read back and validated."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from plugins.types import ImageRef, LocalisationPoint, LocalisationRegion, Prediction
from tests.conftest import require_binary
from workers import outputs, study_report, uids

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
STUDY_UID = uids.derive_uid("test-study")
VIEW_CODES = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}


def make_mammogram(laterality: str = "L", view: str = "CC", *, rows: int = 96, columns: int = 64) -> Dataset:
    """A small but complete Digital Mammography X-Ray Image (For Presentation)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = uids.derive_uid("test-image", laterality, view)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = uids.derive_uid("test-series")
    ds.Modality = "MG"
    ds.PatientName = "SYNTH^OUTPUTS"
    ds.PatientID = "SYNTH-0005"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20260101"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC5"
    ds.StudyID = "5"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1 if view == "CC" else 2
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    code_value, meaning = VIEW_CODES[view]
    view_code = Dataset()
    view_code.CodeValue = code_value
    view_code.CodingSchemeDesignator = "SCT"
    view_code.CodeMeaning = meaning
    ds.ViewCodeSequence = [view_code]
    ds.PatientOrientation = ["P", "R"] if laterality == "L" else ["A", "L"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ramp = np.linspace(0, 4095, rows * columns).reshape(rows, columns).astype(np.uint16)
    ds.PixelData = ramp.tobytes()
    return ds


def make_ultrasound(*, frames: int = 3, rows: int = 80, columns: int = 64) -> Dataset:
    """A small multi-frame RGB Ultrasound Multi-frame Image of the left breast."""
    ds = make_mammogram("L", "CC", rows=rows, columns=columns)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids.derive_uid("test-us", str(frames))
    ds.SeriesInstanceUID = uids.derive_uid("test-us-series")
    ds.Modality = "US"
    for keyword in ("ImageLaterality", "ViewPosition", "ViewCodeSequence", "PresentationIntentType"):
        delattr(ds, keyword)
    del ds.ImagerPixelSpacing
    ds.Laterality = "L"
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 255, (frames, rows, columns, 3), dtype=np.uint8).tobytes()
    return ds


def make_prediction(
    ds: Dataset,
    *,
    classes: tuple[str, ...] = ("benign", "malignant"),
    probabilities: tuple[float, ...] = (0.2, 0.8),
    birads: int | None = None,
    localise: bool = False,
    demo_weights: bool = False,
    model_version: str = "1.0.0",
    frame_index: int = 0,
) -> Prediction:
    """A fabricated prediction on *ds* with a hot square in its heatmap."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    heatmap = np.zeros((rows, columns), dtype=np.float32)
    heatmap[rows // 3 : rows // 2, columns // 3 : columns // 2] = 1.0
    predicted = classes[int(np.argmax(probabilities))]
    return Prediction(
        model_id="test_model.v1",
        model_name="test_model",
        model_version=model_version,
        image=ImageRef(
            path=Path("/nonexistent"),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            modality=str(ds.Modality),
            laterality=str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")),
            view=str(ds.get("ViewPosition", "")),
            number_of_frames=int(ds.get("NumberOfFrames", 1)),
            frame_index=frame_index,
        ),
        classes=classes,
        probabilities=probabilities,
        predicted_class=predicted,
        risk=probabilities[-1],
        birads=birads,
        heatmap=heatmap,
        heatmap_method="Grad-CAM",
        points=(LocalisationPoint(x=20.5, y=40.5, score=0.9, label="malignant"),) if localise else (),
        regions=(
            (LocalisationRegion(points=((10.0, 30.0), (30.0, 30.0), (30.0, 50.0), (10.0, 50.0)), score=0.7),)
            if localise
            else ()
        ),
        demo_weights=demo_weights,
        parameters={"threshold": 0.5},
    )


def round_trip(dataset: Dataset) -> Dataset:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def content_items(item: Dataset) -> Iterator[Dataset]:
    """Every content item below *item*, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from content_items(child)


def concept(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodingSchemeDesignator), str(name.CodeValue)


def texts(dataset: Dataset) -> list[str]:
    return [str(i.TextValue) for i in content_items(dataset) if i.ValueType == "TEXT"]


@pytest.fixture
def images() -> list[Dataset]:
    return [make_mammogram("L", "CC"), make_mammogram("R", "MLO")]


def build_full_sr(images: list[Dataset], **kwargs: object) -> hd.sr.ComprehensiveSR:
    predictions = [
        make_prediction(images[0], birads=4, localise=True, demo_weights=True),
        make_prediction(images[1], probabilities=(0.9, 0.1), birads=2, demo_weights=True),
    ]
    return outputs.build_sr(images, predictions, demo_weights=True, **kwargs)


def test_sr_round_trip_holds_findings_probabilities_birads_and_references(images: list[Dataset]) -> None:
    sr = build_full_sr(images)
    read = hd.sr.srread(io.BytesIO(_bytes(sr)))

    assert read.SOPClassUID == COMPREHENSIVE_SR
    assert read.StudyInstanceUID == STUDY_UID
    assert read.PatientID == "SYNTH-0005" and read.AccessionNumber == "ACC5"
    assert read.SeriesInstanceUID not in {str(ds.SeriesInstanceUID) for ds in images}
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for study in read.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in images}

    # Per image one TID 1501 group: the predicted class as its Finding, the risk under the score meaning's
    # concept (an uncalibrated suspicion score here: never DCM 111047), each class probability, and BI-RADS.
    groups = [g for g in read.content.get_image_measurement_groups() if g.source_images]
    by_image = {str(g.source_images[0].referenced_sop_instance_uid): g for g in groups}
    left, right = (str(ds.SOPInstanceUID) for ds in images)
    assert set(by_image) == {left, right} and len(groups) == 2
    expected = {left: ("malignant", 0.8, 4, (0.2, 0.8)), right: ("benign", 0.1, 2, (0.9, 0.1))}
    for uid, (predicted, risk, birads, (benign, malignant)) in expected.items():
        group = by_image[uid]
        assert group.finding_type == outputs.class_concept(predicted)
        numbers = {str(m.name.value): m.value for m in group.get_measurements()}
        assert "111047" not in numbers
        assert numbers["111012"] == pytest.approx(risk)  # DCM "Certainty of Finding"
        assert numbers["30807003"] == pytest.approx(benign) and numbers["21594007"] == pytest.approx(malignant)
        assert all(m.unit == outputs.NO_UNITS for m in group.get_measurements())
        evaluations = {str(e.name.value): e.value for e in group.get_qualitative_evaluations()}
        assert evaluations["111005"] == outputs.birads_concept(birads)  # Assessment Category
        assert "121073" not in evaluations  # no loose "Impression"

    # TID 4019 in every group: name, version and the parameters.
    for group in read.content.get_image_measurement_groups():
        items = {concept(i): str(i.TextValue) for i in group[0].ContentSequence if i.ValueType == "TEXT"}
        assert items[("DCM", "111001")] == "test_model"
        assert items[("DCM", "111003")] == "1.0.0"
    parameters = [str(i.TextValue) for i in content_items(read) if concept(i) == ("DCM", "111002")]
    assert "threshold=0.5" in parameters and "demo_weights=True" in parameters

    # Every evaluated image is in the image library.
    library = [
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in content_items(read)
        if i.ValueType == "IMAGE" and concept(i) == ("SCT", "260753009")
    ]
    assert {left, right} <= set(library)


def test_sr_scoord_references_the_source_image_in_column_row_order(images: list[Dataset]) -> None:
    read = hd.sr.srread(io.BytesIO(_bytes(build_full_sr(images))))
    rois = read.content.get_planar_roi_measurement_groups()
    assert len(rois) == 2
    by_type = {}
    for group in rois:
        region = group.roi
        (selected_from,) = region.ContentSequence
        assert selected_from.RelationshipType == "SELECTED FROM"
        referenced = selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert str(referenced) == str(images[0].SOPInstanceUID)
        by_type[region.graphic_type.value] = (group, region.value)
    point_group, point = by_type["POINT"]
    np.testing.assert_allclose(point, [[20.5, 40.5]])
    assert point_group.finding_type == outputs.LESION
    assert point_group.get_measurements()[0].value == pytest.approx(0.9)
    region_group, polygon = by_type["POLYLINE"]
    assert region_group.finding_type == outputs.LESION
    # Closed: the first point is repeated at the end; x is the column, y the row.  The 20-pixel square is
    # widened to the smallest region a person can see, around its centre (20, 40).
    side = study_report.MIN_REGION_PIXELS
    np.testing.assert_allclose(
        polygon,
        [[20 - side / 2, 40 - side / 2], [20 + side / 2, 40 - side / 2], [20 + side / 2, 40 + side / 2],
         [20 - side / 2, 40 + side / 2], [20 - side / 2, 40 - side / 2]],
    )


def test_sr_states_it_is_machine_generated_and_flags_demo_weights(images: list[Dataset]) -> None:
    demo = texts(round_trip(build_full_sr(images)))
    assert any("NOT FOR DIAGNOSTIC USE" in t and "Machine-generated" in t for t in demo)
    assert any("UNTRAINED DEMO WEIGHTS" in t for t in demo)

    trained = outputs.build_sr(images[:1], [make_prediction(images[0])], demo_weights=False)
    plain = texts(round_trip(trained))
    assert any("NOT FOR DIAGNOSTIC USE" in t for t in plain)
    assert not any("DEMO WEIGHTS" in t for t in plain)
    assert "NOT FOR DIAGNOSTIC USE" in trained.SeriesDescription


def test_sr_without_birads_or_localisation_has_neither(images: list[Dataset]) -> None:
    sr = outputs.build_sr(images[:1], [make_prediction(images[0])])
    items = list(content_items(round_trip(sr)))
    assert not any(concept(i) == ("DCM", "111005") for i in items)
    assert not any(i.ValueType == "SCOORD" for i in items)


def test_output_uids_are_deterministic(images: list[Dataset]) -> None:
    first = build_full_sr(images)
    second = build_full_sr(images)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    # The order in which images were evaluated does not matter.
    predictions = [make_prediction(images[1]), make_prediction(images[0])]
    reordered = outputs.build_sr(list(reversed(images)), predictions)
    assert reordered.SOPInstanceUID == first.SOPInstanceUID
    tracking = sorted(str(i.UID) for i in content_items(first) if i.ValueType == "UIDREF")
    assert tracking == sorted(str(i.UID) for i in content_items(second) if i.ValueType == "UIDREF")
    # A new model version is a new object in a new series.
    newer = [make_prediction(ds, model_version="1.1.0") for ds in images]
    bumped = outputs.build_sr(images, newer)
    assert bumped.SOPInstanceUID != first.SOPInstanceUID
    assert bumped.SeriesInstanceUID != first.SeriesInstanceUID

    sc_a = outputs.build_heatmap_sc(images[0], None, make_prediction(images[0]))
    sc_b = outputs.build_heatmap_sc(images[0], None, make_prediction(images[0]))
    sc_other = outputs.build_heatmap_sc(images[1], None, make_prediction(images[1]))
    assert sc_a.SOPInstanceUID == sc_b.SOPInstanceUID != sc_other.SOPInstanceUID
    assert sc_a.SeriesInstanceUID == sc_other.SeriesInstanceUID != first.SeriesInstanceUID
    assert len({first.SOPInstanceUID, sc_a.SOPInstanceUID, sc_other.SOPInstanceUID}) == 3


def test_derive_uid_frames_its_parts() -> None:
    assert uids.derive_uid("ab", "c") != uids.derive_uid("a", "bc")
    assert uids.derive_uid("x").startswith(uids.ORG_ROOT)
    assert len(uids.derive_uid("x" * 500)) <= 64


def test_sc_blends_heatmap_with_caption_and_colour_bar(images: list[Dataset]) -> None:
    source = images[0]
    prediction = make_prediction(source, demo_weights=True)
    display = np.full((int(source.Rows), int(source.Columns)), 128, dtype=np.uint8)
    sc = round_trip(outputs.build_heatmap_sc(source, display, prediction, instance_number=3))

    assert sc.SOPClassUID == SECONDARY_CAPTURE
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.PatientID == source.PatientID
    assert "DEMO WEIGHTS" in sc.ImageComments
    assert sc.InstanceNumber == 3

    pixels = sc.pixel_array.astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # The caption banner on top holds yellow text (red and green high, blue low).
    banner = slice(0, pixels.shape[0] // 10)
    yellow = (red[banner] > 200) & (green[banner] > 200) & (blue[banner] < 80)
    assert yellow.sum() > 100
    # The image part sits bottom-left; its last row is cold, so it is plain grey up to the panel.
    grey = (red == green) & (green == blue) & (red > 100) & (red < 160)
    bottom_row = grey[-1]
    width = int(np.argmin(bottom_row)) if not bottom_row.all() else bottom_row.size
    top = int(np.flatnonzero(grey[:, 0])[0])
    left, height = 0, pixels.shape[0] - top
    assert width >= 300  # small sources are enlarged so the caption stays legible
    # The hot square (rows 1/3..1/2, columns 1/3..1/2 of the source) is tinted red.
    hot = pixels[top + int(height * 0.42), left + int(width * 0.42)]
    assert hot[0] > hot[2] + 30 and not (hot[0] == hot[1] == hot[2])
    # Cold regions keep the original grey.
    assert grey[top + int(height * 0.9), left + int(width * 0.9)]
    # The colour bar right of the image runs from red (1.0, top) to blue (0.0, bottom).
    panel = pixels[top:, left + width :]
    saturated = (np.abs(panel[..., 0] - panel[..., 2]) > 100).any(axis=1)
    bar_rows = np.flatnonzero(saturated)
    def most_saturated(row: np.ndarray) -> np.ndarray:
        return row[np.argmax(np.abs(row[:, 0] - row[:, 2]))]

    top_colour = most_saturated(panel[bar_rows[0] + 2])
    bottom_colour = most_saturated(panel[bar_rows[-1] - 2])
    assert top_colour[0] > top_colour[2] and bottom_colour[2] > bottom_colour[0]


def test_sc_caption_omits_demo_notice_for_trained_weights(images: list[Dataset]) -> None:
    sc = outputs.build_heatmap_sc(images[0], None, make_prediction(images[0], demo_weights=False))
    assert sc.ImageComments == "NOT FOR DIAGNOSTIC USE"
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription


def test_large_sources_are_shrunk(images: list[Dataset]) -> None:
    display = np.zeros((3000, 2400), dtype=np.uint8)
    heatmap = np.zeros((300, 240), dtype=np.float32)
    canvas = outputs.render_heatmap_overlay(
        display, heatmap, caption_lines=["NOT FOR DIAGNOSTIC USE"], max_dimension=1024
    )
    assert canvas.shape[0] < 1024 + 200 and canvas.dtype == np.uint8 and canvas.shape[2] == 3


def test_codes_are_standard_where_they_exist() -> None:
    for name in ("malignant", "Benign", "normal", "BI-RADS 3", "birads_5"):
        code = outputs.class_concept(name)
        assert code.scheme_designator == "SCT"
    assert outputs.class_concept("BI-RADS 3") == outputs.birads_concept(3)
    assert outputs.PROBABILITY_OF_CANCER.value == "111047"
    assert outputs.PROBABILITY_OF_CANCER.scheme_designator == "DCM"
    private = outputs.class_concept("architectural distortion")
    assert private.scheme_designator == outputs.PRIVATE_SCHEME
    for category in range(7):
        code = outputs.birads_concept(category)
        assert code.scheme_designator == "SCT" and len(code.meaning) <= 64
    with pytest.raises(ValueError, match="BI-RADS"):
        outputs.birads_concept(7)


def test_sr_with_a_private_class_declares_its_scheme(images: list[Dataset]) -> None:
    prediction = make_prediction(images[0], classes=("normal", "distortion"), probabilities=(0.4, 0.6))
    sr = round_trip(outputs.build_sr(images[:1], [prediction]))
    schemes = [str(item.CodingSchemeDesignator) for item in sr.CodingSchemeIdentificationSequence]
    assert outputs.PRIVATE_SCHEME in schemes
    assert not any(
        item.get("ConceptCodeSequence") and item.ConceptCodeSequence[0].CodingSchemeDesignator == "SRT"
        for item in content_items(sr)
    )


def test_multiframe_sources_are_referenced_by_frame() -> None:
    ultrasound = make_ultrasound(frames=3)
    prediction = make_prediction(ultrasound, localise=True, frame_index=1)
    sr = round_trip(outputs.build_sr([ultrasound], [prediction]))
    # Group sources ("Source of Measurement") and SCOORD sources (SELECTED FROM) name frame 2.
    references = [
        item.ReferencedSOPSequence[0]
        for item in content_items(sr)
        if item.ValueType == "IMAGE"
        and (concept(item) == ("DCM", "121112") or item.RelationshipType == "SELECTED FROM")
    ]
    assert len(references) == 3  # the image's group and its two localisations
    assert all(int(ref.ReferencedFrameNumber) == 2 for ref in references)
    procedures = [
        str(item.ConceptCodeSequence[0].CodeValue)
        for item in sr.ContentSequence
        if concept(item) == ("DCM", "121058")
    ]
    assert procedures == ["363679005"]  # Imaging procedure: CID 100 has no breast ultrasound procedure
    sc = outputs.build_heatmap_sc(ultrasound, None, prediction)
    assert int(sc.SourceImageSequence[0].ReferencedFrameNumber) == 2
    other_frame = outputs.build_heatmap_sc(ultrasound, None, make_prediction(ultrasound))
    assert sc.SOPInstanceUID != other_frame.SOPInstanceUID


def test_invalid_inputs_are_refused(images: list[Dataset]) -> None:
    stranger = make_mammogram("R", "CC")
    with pytest.raises(ValueError, match="not among the evidence"):
        outputs.build_sr(images, [make_prediction(stranger)])
    with pytest.raises(ValueError, match="at least one prediction"):
        outputs.build_sr(images, [])
    outside = dataclasses.replace(make_prediction(images[0]), points=(LocalisationPoint(x=500.0, y=1.0),))
    with pytest.raises(ValueError, match="outside"):
        outputs.build_sr(images, [outside])
    mixed = [make_prediction(images[0]), make_prediction(images[1], model_version="2.0")]
    with pytest.raises(ValueError, match="does not belong"):
        outputs.build_sr(images, mixed)
    no_map = dataclasses.replace(make_prediction(images[0]), heatmap=None)
    with pytest.raises(ValueError, match="no heatmap"):
        outputs.build_heatmap_sc(images[0], None, no_map)
    with pytest.raises(ValueError, match="is on image"):
        outputs.build_heatmap_sc(images[1], None, make_prediction(images[0]))


def _bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    binary = require_binary("dciodvfy")
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


OBJECT_KINDS = [
    "sr_full",
    "sr_plain",
    "sr_private_class",
    "sr_us_multiframe",
    "sc",
    "sc_no_orientation",
    "sc_us_multiframe",
]


@pytest.mark.peers
@pytest.mark.parametrize("kind", OBJECT_KINDS)
def test_dciodvfy_reports_no_errors(kind: str, images: list[Dataset], tmp_path: Path) -> None:
    if kind == "sr_full":
        dataset: Dataset = build_full_sr(images, software_version="0.1.0")
    elif kind == "sr_plain":
        dataset = outputs.build_sr(images[:1], [make_prediction(images[0])])
    elif kind == "sr_private_class":
        prediction = make_prediction(images[0], classes=("normal", "distortion"), probabilities=(0.4, 0.6))
        dataset = outputs.build_sr(images[:1], [prediction])
    elif kind == "sr_us_multiframe":
        ultrasound = make_ultrasound()
        dataset = outputs.build_sr([ultrasound], [make_prediction(ultrasound, localise=True, frame_index=1)])
    elif kind == "sc_us_multiframe":
        ultrasound = make_ultrasound()
        dataset = outputs.build_heatmap_sc(ultrasound, None, make_prediction(ultrasound, frame_index=2))
    elif kind == "sc":
        dataset = outputs.build_heatmap_sc(images[0], None, make_prediction(images[0], demo_weights=True))
    else:
        source = make_mammogram("R", "MLO")
        del source.PatientOrientation
        dataset = outputs.build_heatmap_sc(source, None, make_prediction(source))
    path = tmp_path / f"{kind}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    errors, warnings = _dciodvfy(path)
    assert errors == [], "\n".join(errors + warnings)
    # Every remaining warning must be listed, with its reason, in docs/outputs.md.
    documented = (Path(__file__).resolve().parent.parent / "docs" / "outputs.md").read_text()
    undocumented = [w for w in warnings if w.split(" - ", 1)[-1].strip() not in documented]
    assert undocumented == [], "warnings not explained in docs/outputs.md:\n" + "\n".join(undocumented)
