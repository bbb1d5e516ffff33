"""Tests of the dataset adapters on tiny fixtures mimicking each public layout, and of patient splits."""

from __future__ import annotations

import csv
import datetime
import plistlib
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.synthetic import write_dataset_dir
from training.datasets import (
    DatasetError,
    Record,
    assert_no_patient_leak,
    dataset_fingerprint,
    describe_records,
    kfold_records,
    load_busi,
    load_cbis_ddsm,
    load_generic_csv,
    load_inbreast,
    load_mias,
    mias_mask,
    official_split,
    read_mask,
    split_records,
)


def _touch(path: Path, content: bytes = b"\0" * 132 + b"DICM") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------------
# Generic CSV


def test_generic_csv_reads_the_synthetic_manifest(tmp_path: Path) -> None:
    manifest = write_dataset_dir(tmp_path / "set", "mg", 6, seed=4, size=(96, 80))
    records = load_generic_csv(manifest)
    assert len(records) == 6
    assert {r.label for r in records} == {"benign", "malignant"}
    assert all(r.path.is_file() and r.mask_path is not None and r.mask_path.is_file() for r in records)
    assert all(r.birads in (2, 5) and r.patient_id for r in records)
    mask = read_mask(records[0].mask_path, (96, 80))
    assert mask.dtype == bool and mask.any()
    assert describe_records(records)["patients"] == 3


def test_generic_csv_errors_name_the_file_and_row(tmp_path: Path) -> None:
    _touch(tmp_path / "a.png")
    table = _write_csv(tmp_path / "t.csv", ["path", "label"], [["a.png", "benign"], ["b.png", "malignant"]])
    with pytest.raises(DatasetError, match=r"t\.csv, row 3: image .*b\.png does not exist") as caught:
        load_generic_csv(table)
    assert caught.value.row == 3 and caught.value.file == table
    table = _write_csv(tmp_path / "u.csv", ["path", "label"], [["a.png", ""]])
    with pytest.raises(DatasetError, match=r"u\.csv, row 2: the label of a\.png is empty"):
        load_generic_csv(table)
    table = _write_csv(tmp_path / "v.csv", ["path", "label", "birads"], [["a.png", "benign", "7"]])
    with pytest.raises(DatasetError, match=r"v\.csv, row 2: BI-RADS value '7'"):
        load_generic_csv(table)
    table = _write_csv(tmp_path / "w.csv", ["image", "diagnosis"], [["a.png", "benign"]])
    with pytest.raises(DatasetError, match=r"w\.csv, row 1: has no 'label' column"):
        load_generic_csv(table)


def test_generic_csv_optional_columns_and_semicolons(tmp_path: Path) -> None:
    _touch(tmp_path / "img" / "a.dcm")
    table = _write_csv(
        tmp_path / "t.csv",
        ["Path", "Label", "BI-RADS", "Patient_ID", "site"],
        [["img/a.dcm", "malignant", "4b", "p1", "north"], ["img/a.dcm", "benign", "", "", "south"]],
        delimiter=";",
    )
    first, second = load_generic_csv(table)
    assert (first.birads, first.patient_id, first.extra["site"]) == (4, "p1", "north")
    assert (second.birads, second.patient_id, second.mask_path) == (None, None, None)


# ---------------------------------------------------------------------------------------------------------
# CBIS-DDSM

_CBIS_MASS_HEADER = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type",
    "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path",
    "cropped image file path", "ROI mask file path",
]  # fmt: skip


def _cbis_row(
    patient: str, side: str, view: str, number: int, pathology: str, split: str, assessment: str
) -> list[str]:
    case = f"Mass-{split}_{patient}_{side}_{view}"
    return [
        patient, "3", side, view, str(number), "mass", "OVAL", "CIRCUMSCRIBED", assessment, pathology, "4",
        # All abnormalities of one image share its path, as in the real tables.
        f"{case}/1.3.6.1.4.1.9590.100.1.2.1/1.3.6.1.4.1.9590.100.1.2.2/000000.dcm",
        f"{case}_{number}/1.3.6.1.4.1.9590.100.1.2.3{number}/1.3.6.1.4.1.9590.100.1.2.4{number}/000000.dcm",
        f"{case}_{number}/1.3.6.1.4.1.9590.100.1.2.3{number}/1.3.6.1.4.1.9590.100.1.2.4{number}/000001.dcm\n",
    ]  # fmt: skip


def _cbis_fixture(root: Path) -> None:
    """The NBIA download layout, whose folder names differ from the CSVs' UID paths."""
    images = root / "CBIS-DDSM"
    for case in (
        "Mass-Training_P_00001_LEFT_CC",
        "Mass-Training_P_00002_RIGHT_MLO",
        "Mass-Test_P_00003_LEFT_MLO",
    ):
        _touch(images / case / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515" / "1-1.dcm")
    # ROI folders hold a cropped image and a mask; they must never be taken for the full image.
    _touch(
        images
        / "Mass-Training_P_00001_LEFT_CC_1"
        / "07-21-2016-DDSM-1"
        / "1.000000-ROI mask images-1"
        / "1-1.dcm"
    )
    _write_csv(
        root / "mass_case_description_train_set.csv",
        _CBIS_MASS_HEADER,
        [
            _cbis_row("P_00001", "LEFT", "CC", 1, "BENIGN", "Training", "3"),
            _cbis_row("P_00001", "LEFT", "CC", 2, "MALIGNANT", "Training", "5"),
            _cbis_row("P_00002", "RIGHT", "MLO", 1, "BENIGN_WITHOUT_CALLBACK", "Training", "2"),
        ],
    )
    _write_csv(
        root / "mass_case_description_test_set.csv",
        _CBIS_MASS_HEADER,
        [_cbis_row("P_00003", "LEFT", "MLO", 1, "MALIGNANT", "Test", "4")],
    )


def test_cbis_ddsm_aggregates_rois_per_image(tmp_path: Path) -> None:
    _cbis_fixture(tmp_path)
    records = load_cbis_ddsm(tmp_path)
    by_patient = {r.patient_id: r for r in records}
    assert sorted(by_patient) == ["P_00001", "P_00002", "P_00003"]
    first = by_patient["P_00001"]
    assert first.label == "malignant" and first.birads == 5
    assert first.extra["pathologies"] == ["BENIGN", "MALIGNANT"]
    assert "full mammogram" in str(first.path) and first.path.is_file()
    assert (first.extra["laterality"], first.extra["view"], first.extra["split"]) == ("L", "CC", "train")
    assert len(first.extra["roi_mask_csv_paths"]) == 2 and first.mask_path is None
    assert by_patient["P_00002"].label == "benign" and by_patient["P_00002"].birads == 2
    parts = official_split(records)
    assert {r.patient_id for r in parts["test"]} == {"P_00003"}
    assert len(parts["train"]) == 2


def test_cbis_ddsm_exact_layout_and_errors(tmp_path: Path) -> None:
    row = _cbis_row("P_00009", "RIGHT", "CC", 1, "MALIGNANT", "Training", "5")
    _touch(tmp_path / row[11])
    _touch(tmp_path / row[13].strip())
    _write_csv(tmp_path / "mass_case_description_train_set.csv", _CBIS_MASS_HEADER, [row])
    (record,) = load_cbis_ddsm(tmp_path)
    assert record.path == tmp_path / row[11] and record.mask_path == tmp_path / row[13].strip()
    bad = list(row)
    bad[9] = "UNKNOWN"
    _write_csv(tmp_path / "other" / "mass_case_description_train_set.csv", _CBIS_MASS_HEADER, [row, bad])
    with pytest.raises(
        DatasetError, match=r"mass_case_description_train_set\.csv, row 3: pathology 'UNKNOWN'"
    ):
        load_cbis_ddsm(tmp_path / "other", image_root=tmp_path)
    missing = _cbis_row("P_00010", "LEFT", "CC", 1, "BENIGN", "Training", "2")
    _write_csv(tmp_path / "third" / "mass_case_description_train_set.csv", _CBIS_MASS_HEADER, [missing])
    with pytest.raises(DatasetError, match=r"row 2: image Mass-Training_P_00010_LEFT_CC/.* not found"):
        load_cbis_ddsm(tmp_path / "third")
    with pytest.raises(DatasetError, match="no CBIS-DDSM case-description CSV"):
        load_cbis_ddsm(tmp_path / "third", abnormality=("calc",))


# ---------------------------------------------------------------------------------------------------------
# INbreast

_INBREAST_HEADER = [
    "Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name", "ACR", "Bi-Rads",
    "Mass ", "Micros", "Distortion", "Asymmetry", "Findings Notes (in Portuguese)", "Other Notes",
    "Lesion Annotation Status", "Pectoral Muscle Annotation", "Other Annotations",
]  # fmt: skip


def _inbreast_table(root: Path) -> list[list[str]]:
    """The DICOMs and lesion XML of a tiny INbreast, and its table's rows as the CSV export has them."""
    rows = [
        ("R", "CC", "22678622", "1", "a1b2c3d4e5f60708"),
        ("R", "ML", "22678646", "4a", "a1b2c3d4e5f60708"),
        ("L", "CC", "20586908", "2", "ffeeddccbbaa9988"),
        ("L", "ML", "20586934", "5", "ffeeddccbbaa9988"),
    ]
    table = []
    for side, view, number, birads, patient in rows:
        _touch(root / "AllDICOMs" / f"{number}_{patient}_MG_{side}_{view}_ANON.dcm")
        table.append(["removed", "removed", side, view, "201001", number, "2", birads] + [""] * 9)
    table.append([""] * 17)
    table.append(["", "", "", "", "", "Total", "", ""] + [""] * 9)
    square = ["(10.0, 10.0)", "(30.0, 10.0)", "(30.0, 30.0)", "(10.0, 30.0)"]
    roi = {
        "Images": [
            {
                "ROIs": [
                    {"Name": "Mass", "Point_px": square},
                    {"Name": "Calcification", "Point_px": ["(50.0, 50.0)"]},
                ]
            }
        ]
    }
    (root / "AllXML").mkdir()
    with (root / "AllXML" / "22678646.xml").open("wb") as handle:
        plistlib.dump(roi, handle)
    return table


def _inbreast_fixture(root: Path) -> None:
    _write_csv(root / "INbreast.csv", _INBREAST_HEADER, _inbreast_table(root), delimiter=";")


def test_inbreast_labels_patients_and_masks(tmp_path: Path) -> None:
    _inbreast_fixture(tmp_path)
    records = load_inbreast(tmp_path)
    assert [r.birads for r in records] == [1, 4, 2, 5]
    assert [r.label for r in records] == ["benign", "malignant", "benign", "malignant"]
    assert [r.patient_id for r in records] == ["a1b2c3d4e5f60708"] * 2 + ["ffeeddccbbaa9988"] * 2
    assert records[1].extra["view"] == "MLO" and records[1].extra["birads_raw"] == "4a"
    assert records[1].mask_path is not None and records[0].mask_path is None
    mask = read_mask(records[1].mask_path, (64, 64))
    assert 21 * 21 <= mask.sum() <= 21 * 21 + 40 and mask[20, 20] and mask[50, 50] and not mask[5, 5]
    assert load_inbreast(tmp_path, birads1_as_normal=True)[0].label == "normal"
    assert [r.label for r in load_inbreast(tmp_path, malignant_min_birads=5)].count("malignant") == 1


def test_inbreast_errors(tmp_path: Path) -> None:
    _inbreast_fixture(tmp_path)
    (tmp_path / "AllDICOMs" / "20586934_ffeeddccbbaa9988_MG_L_ML_ANON.dcm").unlink()
    with pytest.raises(DatasetError, match=r"INbreast\.csv, row 5: no DICOM named 20586934_\*\.dcm"):
        load_inbreast(tmp_path)
    assert len(load_inbreast(tmp_path, check_files=False)) == 4


#: The acquisition date of the second image is a date-formatted cell in the spreadsheets.
_INBREAST_DATE = datetime.datetime(2010, 1, 15)


def _sheet_value(text: str) -> str | int | float:
    """A CSV cell as the released spreadsheet types it: digits are numeric cells (File Name, ACR...)."""
    return int(text) if text.isdigit() else text


def _inbreast_sheet(root: Path) -> list[list[Any]]:
    rows: list[list[Any]] = [list(_INBREAST_HEADER)]
    rows += [[_sheet_value(cell) for cell in row] for row in _inbreast_table(root)]
    rows[2][4] = _INBREAST_DATE
    return rows


def _write_xls(path: Path, rows: list[list[Any]]) -> Path:
    xlwt = pytest.importorskip("xlwt")
    book = xlwt.Workbook()
    sheet = book.add_sheet("INbreast")
    date_style = xlwt.easyxf(num_format_str="YYYY-MM-DD")
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            if isinstance(value, datetime.datetime):
                sheet.write(r, c, value, date_style)
            elif value != "":
                # xlwt stores every number as a float, as Excel does: 20586934 comes back as 20586934.0.
                sheet.write(r, c, value)
    book.add_sheet("notes").write(0, 0, "only the first sheet is read")
    book.save(str(path))
    return path


def _write_xlsx(path: Path, rows: list[list[Any]]) -> Path:
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    for row in rows:
        sheet.append([None if value == "" else value for value in row])
    for cell in sheet["E"]:
        if isinstance(cell.value, datetime.datetime):
            cell.number_format = "yyyy-mm-dd"
    book.create_sheet("notes")["A1"] = "only the first sheet is read"
    book.save(path)
    return path


@pytest.mark.parametrize("suffix", [".xls", ".xlsx"])
def test_inbreast_spreadsheet_reads_as_its_csv_export(tmp_path: Path, suffix: str) -> None:
    csv_root, sheet_root = tmp_path / "csv", tmp_path / "sheet"
    _inbreast_fixture(csv_root)
    rows = _inbreast_sheet(sheet_root)
    table = sheet_root / f"INbreast{suffix}"
    (_write_xls if suffix == ".xls" else _write_xlsx)(table, rows)
    expected = load_inbreast(csv_root)
    records = load_inbreast(sheet_root)  # found on its own: no CSV beside it
    assert [r.path.name for r in records] == [r.path.name for r in expected]
    assert [r.label for r in records] == [r.label for r in expected]
    assert [r.birads for r in records] == [1, 4, 2, 5] == [r.birads for r in expected]
    assert [r.patient_id for r in records] == [r.patient_id for r in expected]
    assert [r.mask_path is not None for r in records] == [False, True, False, False]
    for record, reference in zip(records, expected, strict=True):
        assert record.extra["table"] == str(table)
        assert record.extra["row"] == reference.extra["row"]
        assert record.extra["birads_raw"] == reference.extra["birads_raw"]
        assert record.extra["density"] == "2"
    assert [r.extra["acquisition_date"] for r in records] == ["201001", "2010-01-15", "201001", "201001"]
    assert load_inbreast(sheet_root, table=table, birads1_as_normal=True)[0].label == "normal"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("INbreast.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"junk" * 200),  # OLE magic, no BIFF
        ("INbreast.xlsx", b"PK\x03\x04junk"),  # zip magic, no archive
    ],
)
def test_inbreast_corrupt_spreadsheet_names_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    _touch(tmp_path / name, content)
    with pytest.raises(DatasetError, match=re.escape(f"{name}: cannot read the spreadsheet: ")) as caught:
        load_inbreast(tmp_path, table=tmp_path / name)
    assert caught.value.file == tmp_path / name and caught.value.row is None


def test_inbreast_xls_without_xlrd_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(tmp_path / "INbreast.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")
    monkeypatch.setitem(sys.modules, "xlrd", None)  # makes `import xlrd` raise ImportError
    with pytest.raises(
        DatasetError, match=r"INbreast\.xls: .*needs the xlrd package.*pip install xlrd.*CSV"
    ):
        load_inbreast(tmp_path, table=tmp_path / "INbreast.xls")


# ---------------------------------------------------------------------------------------------------------
# MIAS

_MIAS_INFO = """\
MIAS database info: refnum, tissue, class, severity, x, y, radius
mdb001 G CIRC B 535 425 197
mdb002 G CIRC B 522 280 69
mdb003 D NORM
mdb004 D NORM
mdb005 F CIRC B 477 133 30
mdb005 F CIRC M 500 168 26
mdb006 F CALC M * *NOTE 3*
"""


def test_mias_reads_info_and_pairs_patients(tmp_path: Path) -> None:
    (tmp_path / "Info.txt").write_text(_MIAS_INFO)
    for number in range(1, 7):
        cv2.imwrite(str(tmp_path / f"mdb{number:03d}.pgm"), np.zeros((64, 64), np.uint8))
    records = {r.path.stem: r for r in load_mias(tmp_path)}
    assert [records[f"mdb00{i}"].label for i in range(1, 7)] == [
        "benign", "benign", "normal", "normal", "malignant", "malignant",
    ]  # fmt: skip
    assert records["mdb001"].patient_id == records["mdb002"].patient_id != records["mdb003"].patient_id
    assert len(records["mdb005"].extra["abnormalities"]) == 2
    assert records["mdb006"].extra["abnormalities"][0]["x"] is None
    assert records["mdb006"].extra["abnormalities"][0]["note"] == "*NOTE 3*"
    assert load_mias(tmp_path, normal_as_benign=True)[2].label == "benign"
    # MIAS coordinates start at the bottom-left corner.
    mask = mias_mask(records["mdb002"], (1024, 1024))
    assert mask[1023 - 280, 522] and not mask[280, 522]
    assert abs(int(mask.sum()) - np.pi * 69**2) < 0.02 * np.pi * 69**2


def test_mias_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "Info.txt").write_text("mdb001 G CIRC X 1 2 3\n")
    with pytest.raises(DatasetError, match=r"Info\.txt, row 1: mdb001: severity 'X' is not B or M"):
        load_mias(tmp_path)
    (tmp_path / "Info.txt").write_text("header\nmdb001 G CIRC B 1 2 3\n")
    with pytest.raises(DatasetError, match=r"Info\.txt, row 2: image mdb001\.pgm not found"):
        load_mias(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# BUSI


def test_busi_class_folders_and_masks(tmp_path: Path) -> None:
    root = tmp_path / "Dataset_BUSI_with_GT"
    image = np.zeros((32, 40), np.uint8)
    lesion = image.copy()
    lesion[10:20, 10:20] = 255
    for name in ("benign (1)", "benign (2)", "malignant (1)", "normal (1)"):
        folder = root / name.split(" ")[0]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{name}.png"), image)
        cv2.imwrite(str(folder / f"{name}_mask.png"), lesion if not name.startswith("normal") else image)
    cv2.imwrite(str(root / "benign" / "benign (1)_mask_1.png"), lesion)
    records = load_busi(tmp_path)
    assert Counter(r.label for r in records) == {"benign": 2, "malignant": 1, "normal": 1}
    first = next(r for r in records if r.path.name == "benign (1).png")
    assert first.mask_path is not None and first.mask_path.name == "benign (1)_mask.png"
    assert [Path(p).name for p in first.extra["extra_masks"]] == ["benign (1)_mask_1.png"]
    assert read_mask(first.mask_path).sum() == 100
    assert all(r.patient_id is None for r in records)
    assert len(load_busi(root, classes=("benign", "malignant"))) == 3
    with pytest.raises(DatasetError, match=r"benign: no 'benign' class folder \(found: none\)"):
        load_busi(root / "benign")


# ---------------------------------------------------------------------------------------------------------
# Splits


def _cohort(n_patients: int, seed: int = 0) -> list[Record]:
    """Patients with 1-4 images each, imbalanced labels, plus a few images without a patient."""
    rng = random.Random(seed)
    records = []
    for p in range(n_patients):
        label = rng.choices(["benign", "malignant", "normal"], weights=[5, 3, 2])[0]
        for i in range(rng.randint(1, 4)):
            records.append(Record(Path(f"/data/p{p}/{i}.dcm"), label, patient_id=f"p{p}"))
    records += [Record(Path(f"/data/anon/{i}.png"), "benign") for i in range(6)]
    return records


def test_split_records_is_patient_level_stratified_and_seeded() -> None:
    records = _cohort(120)
    parts = split_records(records, seed=7)
    assert_no_patient_leak(parts)
    assert sum(len(v) for v in parts.values()) == len(records)
    total = Counter(r.label for r in records)
    for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(len(parts[name]) / len(records) - share) < 0.04
        counts = Counter(r.label for r in parts[name])
        for label, n in total.items():
            assert abs(counts[label] / n - share) < 0.08, (name, label)
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    again = split_records(shuffled, seed=7)
    assert {k: {r.path for r in v} for k, v in again.items()} == {
        k: {r.path for r in v} for k, v in parts.items()
    }
    other = split_records(records, seed=8)
    assert {r.path for r in other["test"]} != {r.path for r in parts["test"]}
    two = split_records(records, {"train": 0.9, "val": 0.1, "test": 0.0})
    assert not two["test"] and len(two["val"]) > 0


def test_kfold_covers_every_record_once_without_leaks() -> None:
    records = _cohort(60, seed=3)
    folds = kfold_records(records, k=5, seed=1)
    seen: Counter[Path] = Counter()
    for train, test in folds:
        assert_no_patient_leak({"train": train, "test": test})
        assert len(train) + len(test) == len(records)
        seen.update(r.path for r in test)
        assert abs(len(test) - len(records) / 5) <= 4
    assert set(seen.values()) == {1} and len(seen) == len(records)
    with pytest.raises(ValueError, match="at least"):
        kfold_records(records[:2], k=5)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=30),
    labels=st.lists(st.sampled_from(["a", "b", "c"]), min_size=30, max_size=30),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_splits_never_leak_a_patient(sizes: list[int], labels: list[str], seed: int) -> None:
    records = [
        Record(Path(f"/x/{p}/{i}"), labels[p], patient_id=f"p{p}")
        for p, size in enumerate(sizes)
        for i in range(size)
    ]
    parts = split_records(records, seed=seed)
    assert_no_patient_leak(parts)
    assert sorted(r.path for part in parts.values() for r in part) == sorted(r.path for r in records)


def test_leak_check_names_the_patient() -> None:
    a, b = Record(Path("/1"), "x", patient_id="p7"), Record(Path("/2"), "x", patient_id="p7")
    with pytest.raises(ValueError, match="patient:p7 is in both the 'train' and the 'test' part"):
        assert_no_patient_leak({"train": [a], "test": [b]})


def test_fingerprint_ignores_order_and_mount_point() -> None:
    here = [
        Record(Path("/mnt/a/set/x.dcm"), "benign", 2, "p1"),
        Record(Path("/mnt/a/set/y.dcm"), "malignant"),
    ]
    there = [Record(Path("/data/set/y.dcm"), "malignant"), Record(Path("/data/set/x.dcm"), "benign", 2, "p1")]
    assert dataset_fingerprint(here) == dataset_fingerprint(there)
    changed = [here[0], Record(Path("/mnt/a/set/y.dcm"), "benign")]
    assert dataset_fingerprint(changed) != dataset_fingerprint(here)
