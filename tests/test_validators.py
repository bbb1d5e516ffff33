"""Every object the pipeline sends back passes the real validators, for every built-in model and every kind of
source we accept.

The built-in models run with random demo weights (what they say does not matter here, only what we write) on
small synthetic mammograms and on vendor-like ultrasound files in every transfer syntax and photometric
interpretation the gateway accepts: JPEG baseline (YBR_FULL_422), JPEG 2000, RLE, PALETTE COLOR, YBR_FULL,
explicit big endian, multi-frame, and a single-frame US Image whose Number of Frames says 2.  Each file is
made here with pydicom and its encoders (Pillow, pylibjpeg-openjpeg); nothing is downloaded.

dciodvfy: no error, and no warning beyond those the source itself raises or those listed with their reason
in docs/outputs.md ("Validator warnings").  PixelMed's DicomSRValidator: no error on any SR.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from gateway.messages import InstanceRef, Priority, StudyJob
from gateway.settings import Settings, load_settings
from plugins.host import ModelHost
from plugins.synthetic import make_mg_study, make_us_image
from tests import validators
from tests.utils import write
from workers import pipeline

REPO = Path(__file__).resolve().parent.parent
MG_MODELS = ["asg_mammonet", "clgb_net", "lem", "hybrid_birads"]
US_MODELS = ["us_fusion"]
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SMALL_US = (120, 160)
SMALL_MG = (128, 104)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("validators")
    path = root / "site.yaml"
    data: dict[str, object] = {
        "gateway": {"data_dir": str(root / "data")},
        "logging": {"level": "WARNING"},
        "plugins": {"load_entrypoints": False, "allow_demo_weights": True},
    }
    if "outputs" in Settings.model_fields:
        # Every model's heatmaps and SR, so each model's SCs are validated; the study SR is built below.
        data["outputs"] = {"report": "per-model"}
    path.write_text(yaml.safe_dump(data))
    return load_settings(path, environ={})


@pytest.fixture(scope="module")
def host(settings: Settings) -> ModelHost:
    return ModelHost(settings, device="cpu")


def _job(datasets: list[Dataset], store: Path) -> StudyJob:
    instances = []
    for ds in datasets:
        path = write(ds, store)
        instances.append(
            InstanceRef(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.Modality),
                path=path.name,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                study_version=1,
            )
        )
    study_uid = str(datasets[0].StudyInstanceUID)
    return StudyJob(
        job_id=f"{study_uid[-12:]}-v1",
        study_instance_uid=study_uid,
        study_version=1,
        calling_ae="MODALITY",
        priority=Priority.ROUTINE,
        storage_root=str(store),
        instances=tuple(instances),
    )


def _analyse(
    host: ModelHost, settings: Settings, models: list[str], datasets: list[Dataset], tmp_path: Path
) -> tuple[list[Path], list[Path]]:
    """Run *models* over *datasets* through the study pipeline; return (source files, output files)."""
    job = _job(datasets, tmp_path / "store")
    sources = pipeline.read_sources(job)
    runs = pipeline.analyse_study(host, models, sources, settings, tmp_path / "out")
    for run in runs:
        assert run.outputs_error is None, f"{run.model}: {run.outputs_error}"
        assert not run.failures, f"{run.model}: {[f.error for f in run.failures]}"
        assert run.predictions, f"{run.model} evaluated nothing: {[s.reason for s in run.skipped]}"
    study_report = getattr(pipeline, "write_study_report", None)
    if study_report is not None:  # the study SR, from every model's kept predictions
        assert study_report(sources, tmp_path / "out", None, settings), "no study SR was written"
    outputs = sorted({path for run in runs for path in run.outputs})
    outputs += sorted(p for p in (tmp_path / "out").rglob("*.dcm") if p not in outputs)
    assert outputs, "the pipeline wrote nothing"
    return [s.path for s in sources], outputs


def _warning_text(line: str) -> str:
    """A warning without its position, so the same warning in the source and in an output compares equal."""
    return line.split(" - ", 1)[-1].strip()


def _documented_warnings() -> str:
    return (REPO / "docs" / "outputs.md").read_text()


def _is_study_report(path: Path) -> bool:
    return path.parent.name == getattr(pipeline, "STUDY_REPORT_DIR", path.parent.name)


def assert_outputs_validate(sources: list[Path], outputs: list[Path], *, pixelmed: bool) -> None:
    """dciodvfy on every output; PixelMed, when *pixelmed*, on the study SR (every model's results in one
    document, built by the same code as a per-model SR; PixelMed takes tens of seconds per SR on a busy
    machine, so the cases whose SR content differs are the ones it reads)."""
    inherited = {_warning_text(w) for source in sources for w in validators.dciodvfy(source)[1]}
    documented = _documented_warnings()
    problems = []
    for path in outputs:
        errors, warnings = validators.dciodvfy(path)
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        kind = f"{dataset.SOPClassUID.name} {path.name}"
        problems += [f"{kind}: dciodvfy {line}" for line in errors]
        problems += [
            f"{kind}: dciodvfy {line} (neither in the source nor in docs/outputs.md)"
            for line in warnings
            if _warning_text(line) not in inherited and _warning_text(line) not in documented
        ]
        if pixelmed and dataset.Modality == "SR" and _is_study_report(path):
            problems += [f"{kind}: PixelMed {line}" for line in validators.pixelmed_sr_errors(path)]
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Vendor-like ultrasound sources
# ---------------------------------------------------------------------------------------------


def _rgb_us(seed: int = 1, **options: object) -> Dataset:
    return make_us_image(seed, size=SMALL_US, photometric="RGB", **options).dataset  # type: ignore[arg-type]


def _jpeg_baseline() -> Dataset:
    """What most ultrasound scanners send: RGB pixels as 4:2:2 JPEG baseline, YBR_FULL_422."""
    ds = _rgb_us()
    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buffer, format="JPEG", quality=90, subsampling=1)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{ds.Rows * ds.Columns * 3 / len(buffer.getvalue()):.2f}"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def _jpeg2000() -> Dataset:
    ds = _rgb_us()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def _rle() -> Dataset:
    ds = _rgb_us()
    ds.compress(RLELossless)
    return ds


def _palette() -> Dataset:
    """A grey image stored as PALETTE COLOR indices with a warm 256-entry palette (as some scanners send)."""
    ds = make_us_image(2, size=SMALL_US).dataset
    ramp = np.arange(256, dtype=np.uint16)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour, lut in (
        ("Red", ramp),
        ("Green", (ramp * 0.9).astype(np.uint16)),
        ("Blue", (ramp * 0.7).astype(np.uint16)),
    ):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", (lut * 257).astype("<u2").tobytes())
    return ds


def _ybr_full() -> Dataset:
    ds = _rgb_us()
    ds.PixelData = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    return ds


def _big_endian() -> Dataset:
    ds = make_us_image(3, size=SMALL_US).dataset
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    return ds


def _multiframe() -> Dataset:
    return make_us_image(4, size=SMALL_US, frames=3).dataset


def _single_frame_saying_two() -> Dataset:
    """A US Image (single-frame IOD) whose Number of Frames says 2 over one frame of data, and whose
    Laterality is present but empty: both seen from scanners in the field."""
    ds = make_us_image(5, size=SMALL_US).dataset
    ds.NumberOfFrames = 2
    ds.Laterality = ""
    return ds


US_SOURCES = {
    "jpeg_baseline_ybr_full_422": _jpeg_baseline,
    "jpeg2000": _jpeg2000,
    "rle": _rle,
    "palette_color": _palette,
    "ybr_full": _ybr_full,
    "big_endian": _big_endian,
    "multiframe": _multiframe,
    "single_frame_with_number_of_frames": _single_frame_saying_two,
}


#: The ultrasound cases whose SR differs (frame references); PixelMed reads their study SR.
US_PIXELMED = {"multiframe", "single_frame_with_number_of_frames"}


@pytest.mark.parametrize("kind", sorted(US_SOURCES))
def test_ultrasound_outputs_validate(kind: str, host: ModelHost, settings: Settings, tmp_path: Path) -> None:
    source = US_SOURCES[kind]()
    sources, outputs = _analyse(host, settings, US_MODELS, [source], tmp_path)
    assert_outputs_validate(sources, outputs, pixelmed=kind in US_PIXELMED)
    captures = [pydicom.dcmread(p, stop_before_pixels=True) for p in outputs]
    captures = [sc for sc in captures if sc.Modality != "SR"]
    assert captures, "no heatmap SC was written"
    if kind == "single_frame_with_number_of_frames":
        for sc in captures:
            assert "Laterality" in sc and sc.Laterality == ""  # present and empty, as in the source
            assert "ReferencedFrameNumber" not in sc.SourceImageSequence[0]


# ---------------------------------------------------------------------------------------------
# Mammography
# ---------------------------------------------------------------------------------------------


def _mammograms() -> list[Dataset]:
    """One view per breast (keeps the four models' run short): a MONOCHROME2 left CC and a MONOCHROME1 right
    view of the same study, the second with Laterality present and empty."""
    plain = make_mg_study(7, "malignant", SMALL_MG)[0]
    inverted = make_mg_study(8, "benign", SMALL_MG, photometric="MONOCHROME1")[1]
    for keyword in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
    ):
        if keyword in plain:
            setattr(inverted, keyword, plain.get(keyword))
    inverted.Laterality = ""
    return [plain, inverted]


def test_mammography_outputs_validate(host: ModelHost, settings: Settings, tmp_path: Path) -> None:
    sources, outputs = _analyse(host, settings, MG_MODELS, _mammograms(), tmp_path)
    assert_outputs_validate(sources, outputs, pixelmed=True)


def test_generated_sources_are_what_they_claim() -> None:
    """The fixtures really are in the encodings the test names (a fixture that silently fell back to plain
    little endian would make the test above say nothing)."""
    expected = {
        "jpeg_baseline_ybr_full_422": (JPEGBaseline8Bit, "YBR_FULL_422"),
        "jpeg2000": (JPEG2000Lossless, None),
        "rle": (RLELossless, "RGB"),
        "palette_color": (None, "PALETTE COLOR"),
        "ybr_full": (None, "YBR_FULL"),
        "big_endian": (ExplicitVRBigEndian, "MONOCHROME2"),
    }
    for kind, (syntax, photometric) in expected.items():
        ds = US_SOURCES[kind]()
        if syntax is not None:
            assert ds.file_meta.TransferSyntaxUID == syntax, kind
        if photometric is not None:
            assert ds.PhotometricInterpretation == photometric, kind
        assert ds.pixel_array.shape[:2] == SMALL_US, kind
    assert US_SOURCES["multiframe"]().SOPClassUID == US_MULTIFRAME
