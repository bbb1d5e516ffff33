"""Dataset adapters (CBIS-DDSM, INbreast, MIAS, BUSI, generic CSV) into one record list; patient-level splits.

Every adapter returns a list of :class:`Record`.  Labels are lower-case class names ("normal", "benign",
"malignant") except where the source gives something else (the generic CSV keeps its labels as written).
A malformed input raises :class:`DatasetError`, whose message names the file and, for tables, the row as a
spreadsheet shows it (the header is row 1, the first record row 2).

Splits never put one patient in two parts: images are grouped by ``patient_id`` where the source knows it
(an image without one is its own group), and groups are assigned whole, stratified by label, from a seed.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import math
import os
import plistlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gateway.errors import PacsTriageError

__all__ = [
    "BUSI_CLASSES",
    "CBIS_CSV_NAMES",
    "DatasetError",
    "Record",
    "assert_no_patient_leak",
    "dataset_fingerprint",
    "describe_records",
    "inbreast_xml_mask",
    "kfold_records",
    "load_busi",
    "load_cbis_ddsm",
    "load_generic_csv",
    "load_inbreast",
    "load_mias",
    "mias_mask",
    "official_split",
    "patient_groups",
    "read_mask",
    "split_records",
]

BUSI_CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")
#: The four case-description tables of CBIS-DDSM, by abnormality type.
CBIS_CSV_NAMES: dict[str, tuple[str, ...]] = {
    "mass": ("mass_case_description_train_set.csv", "mass_case_description_test_set.csv"),
    "calc": ("calc_case_description_train_set.csv", "calc_case_description_test_set.csv"),
}
_CBIS_PATHOLOGY = {"BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign", "MALIGNANT": "malignant"}
_MIAS_TISSUE = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
_MIAS_CLASSES = {"CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM"}
_IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".pgm", ".tif", ".tiff")


class DatasetError(PacsTriageError):
    """A dataset cannot be read; ``file`` and ``row`` say where (``row`` is None for whole-file problems)."""

    def __init__(self, file: str | Path, row: int | None, message: str) -> None:
        """Build the message "<file>, row <row>: <message>".

        :param file: the file that cannot be read.
        :param row: the spreadsheet row (header = 1) or the text line, or None.
        :param message: what is wrong.
        """
        where = f"{file}, row {row}" if row is not None else f"{file}"
        super().__init__(f"{where}: {message}")
        self.file = Path(file)
        self.row = row


@dataclass(frozen=True)
class Record:
    """One training image: where it is, its label and what else the source says about it."""

    path: Path
    label: str
    #: BI-RADS category as an int (4a/4b/4c count as 4), or None when the source has none.
    birads: int | None = None
    #: Patient identity used for splitting; None when the source does not know it.
    patient_id: str | None = None
    #: Lesion mask: a PNG/JPEG, a DICOM or an INbreast XML (read it with :func:`read_mask`).
    mask_path: Path | None = None
    #: Whatever else the source says (laterality, view, official split...); not part of equality or hash.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def group(self) -> str:
        """The unit a split keeps together: the patient, or the image itself when the patient is unknown."""
        return f"patient:{self.patient_id}" if self.patient_id else f"image:{self.path}"


# ---------------------------------------------------------------------------------------------------------
# Table reading


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (normalised) and (spreadsheet row, record) pairs of a CSV whose delimiter is sniffed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    except OSError as error:
        raise DatasetError(path, None, f"cannot read the table: {error.strerror or error}") from error
    if not text.strip():
        raise DatasetError(path, None, "the table is empty")
    first_line = text.splitlines()[0]
    # The official INbreast.csv uses ";"; most others use ",". Pick whichever splits the header most.
    delimiter = max((",", ";", "\t"), key=first_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [_normalise_column(cell) for cell in next(reader)]
    rows: list[tuple[int, dict[str, str]]] = []
    for row_number, cells in enumerate(reader, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header) :]):
            raise DatasetError(path, row_number, f"has {len(cells)} cells but the header has {len(header)}")
        padded = cells + [""] * (len(header) - len(cells))
        rows.append((row_number, {name: padded[i].strip() for i, name in enumerate(header) if name}))
    return header, rows


def _number_text(value: float) -> str:
    """A spreadsheet number as its CSV export writes it: whole numbers without ".0" (file names, dates)."""
    if math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _temporal_text(value: datetime.datetime | datetime.date | datetime.time) -> str:
    """ISO text; a date-time at midnight is a date, since that is how a date-formatted cell is typed."""
    if isinstance(value, datetime.datetime) and value.time() == datetime.time(0):
        return value.date().isoformat()
    return value.isoformat()


def _xls_cell_text(cell: Any, datemode: int) -> str:
    import xlrd  # type: ignore[import-untyped,import-not-found,unused-ignore]

    kind, value = cell.ctype, cell.value
    if kind in (xlrd.XL_CELL_EMPTY, xlrd.XL_CELL_BLANK):
        return ""
    if kind == xlrd.XL_CELL_NUMBER:
        return _number_text(value)
    if kind == xlrd.XL_CELL_DATE:
        try:
            year, month, day, hour, minute, second = xlrd.xldate_as_tuple(value, datemode)
        except xlrd.XLDateError:
            return _number_text(value)  # an out-of-range "date" is still the number the sheet holds
        if (year, month, day) == (0, 0, 0):
            return datetime.time(hour, minute, second).isoformat()
        return _temporal_text(datetime.datetime(year, month, day, hour, minute, second))
    if kind == xlrd.XL_CELL_BOOLEAN:
        return "TRUE" if value else "FALSE"
    if kind == xlrd.XL_CELL_ERROR:
        return str(xlrd.error_text_from_code.get(value, f"#ERROR{value}"))
    return str(value).strip()


def _xlsx_cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):  # before the numbers: bool is an int
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return _number_text(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return _temporal_text(value)
    return str(value).strip()


def _missing_excel_package(path: Path, package: str, error: ImportError) -> DatasetError:
    return DatasetError(
        path,
        None,
        f"reading {path.suffix or 'Excel'} spreadsheets needs the {package} package, which is not installed "
        f"({error}); install it (pip install {package}, or the ml extra) or export the first sheet as CSV "
        f"(for example: soffice --headless --convert-to csv {path.name}) and pass the CSV instead",
    )


def _xls_grid(path: Path) -> list[list[str]]:
    """Cell texts of the first sheet of a legacy (BIFF) .xls, row by row from row 1."""
    try:
        import xlrd  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as error:
        raise _missing_excel_package(path, "xlrd", error) from error
    try:
        book = xlrd.open_workbook(str(path), on_demand=True)
    except Exception as error:  # xlrd raises XLRDError, CompDocError, struct.error... for a corrupt file
        raise DatasetError(path, None, f"cannot read the spreadsheet: {error}") from error
    try:
        if book.nsheets < 1:
            return []
        sheet = book.sheet_by_index(0)
        return [[_xls_cell_text(cell, book.datemode) for cell in sheet.row(i)] for i in range(sheet.nrows)]
    except Exception as error:
        raise DatasetError(path, None, f"cannot read the spreadsheet: {error}") from error
    finally:
        book.release_resources()


def _xlsx_grid(path: Path) -> list[list[str]]:
    """Cell texts of the first sheet of an .xlsx, row by row from row 1 (formulas as last computed)."""
    try:
        import openpyxl  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as error:
        raise _missing_excel_package(path, "openpyxl", error) from error
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as error:  # BadZipFile, KeyError, InvalidFileException... for a corrupt file
        raise DatasetError(path, None, f"cannot read the spreadsheet: {error}") from error
    try:
        if not book.worksheets:
            return []
        sheet = book.worksheets[0]
        # Some writers record a wrong sheet size, and read-only mode would then cut the rows off there.
        sheet.reset_dimensions()
        return [[_xlsx_cell_text(value) for value in row] for row in sheet.iter_rows(values_only=True)]
    except Exception as error:  # the sheet's XML is parsed lazily, so corruption may surface here
        raise DatasetError(path, None, f"cannot read the spreadsheet: {error}") from error
    finally:
        book.close()


def _is_xlsx(path: Path) -> bool:
    """True for a zip (.xlsx) file, False for anything else (a legacy .xls is an OLE file).

    The content decides, not the suffix, because a sheet saved as .xlsx but named .xls (or the reverse)
    is common and each library refuses the other's format.
    """
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise DatasetError(path, None, f"cannot read the spreadsheet: {error.strerror or error}") from error
    if magic == b"PK\x03\x04":
        return True
    if magic == b"\xd0\xcf\x11\xe0":
        return False
    return path.suffix.lower() == ".xlsx"


def _read_excel_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (normalised) and (sheet row, record) pairs of the first sheet of an .xls (xlrd) or .xlsx
    (openpyxl); cells become the text a CSV export holds, so every adapter reads both alike."""
    grid = _xlsx_grid(path) if _is_xlsx(path) else _xls_grid(path)
    numbered = [(number, cells) for number, cells in enumerate(grid, start=1) if any(cells)]
    if not numbered:
        raise DatasetError(path, None, "the spreadsheet's first sheet is empty")
    header_cells = numbered[0][1]
    header = [_normalise_column(cell) for cell in header_cells]
    rows: list[tuple[int, dict[str, str]]] = []
    for row_number, cells in numbered[1:]:
        # Cells under no header (notes beside the table) are dropped, as a CSV export's extra columns.
        padded = cells + [""] * (len(header) - len(cells))
        rows.append((row_number, {name: padded[i] for i, name in enumerate(header) if name}))
    return header, rows


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    if not path.is_file():
        raise DatasetError(path, None, "the table does not exist")
    if path.suffix.lower() in (".xls", ".xlsx"):
        return _read_excel_rows(path)
    return _read_csv_rows(path)


def _column(header: Sequence[str], path: Path, *candidates: str, required: bool = True) -> str | None:
    for candidate in candidates:
        if _normalise_column(candidate) in header:
            return _normalise_column(candidate)
    if required:
        raise DatasetError(path, 1, f"has no {candidates[0]!r} column (columns: {', '.join(header)})")
    return None


def _parse_birads(value: str, path: Path, row: int) -> int | None:
    """'4', '4a', '4B', '4.0' -> 4; '' -> None; anything else is an error naming the row."""
    text = value.strip().lower()
    if not text:
        return None
    match = re.fullmatch(r"(\d)(?:\.0+)?\s*[abc]?", text)
    if not match or not 0 <= int(match.group(1)) <= 6:
        raise DatasetError(path, row, f"BI-RADS value {value!r} is not a category 0-6 (4a/4b/4c allowed)")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------------------
# Generic CSV


def load_generic_csv(
    csv_path: str | Path, *, root: str | Path | None = None, check_files: bool = True
) -> list[Record]:
    """Read records from a CSV with columns ``path,label`` and optionally ``birads,patient_id,mask``.

    Other columns go to ``Record.extra``.  Relative paths are resolved against ``root`` (default: the CSV's
    folder).  :func:`plugins.synthetic.write_dataset_dir` writes this format.

    :param csv_path: the CSV (comma, semicolon or tab separated; a UTF-8 BOM is fine).
    :param root: folder that relative image and mask paths start from.
    :param check_files: raise when an image or mask file does not exist.
    """
    path = Path(csv_path)
    header, rows = _read_table(path)
    base = Path(root) if root is not None else path.parent
    path_col = _column(header, path, "path", "image_path", "image", "file")
    label_col = _column(header, path, "label", "class", "pathology")
    birads_col = _column(header, path, "birads", "bi-rads", required=False)
    patient_col = _column(header, path, "patient_id", "patient", required=False)
    mask_col = _column(header, path, "mask", "mask_path", required=False)
    used = {path_col, label_col, birads_col, patient_col, mask_col}
    records = []
    for row_number, row in rows:
        image = row[path_col or ""]
        label = row[label_col or ""]
        if not image:
            raise DatasetError(path, row_number, "the path cell is empty")
        if not label:
            raise DatasetError(path, row_number, f"the label of {image} is empty")
        image_path = _resolve(base, image)
        if check_files and not image_path.is_file():
            raise DatasetError(path, row_number, f"image {image_path} does not exist")
        mask_path = None
        if mask_col and row[mask_col]:
            mask_path = _resolve(base, row[mask_col])
            if check_files and not mask_path.is_file():
                raise DatasetError(path, row_number, f"mask {mask_path} does not exist")
        records.append(
            Record(
                path=image_path,
                label=label,
                birads=_parse_birads(row[birads_col], path, row_number) if birads_col else None,
                patient_id=(row[patient_col] or None) if patient_col else None,
                mask_path=mask_path,
                extra={"source": "csv", "row": row_number}
                | {name: value for name, value in row.items() if name not in used},
            )
        )
    if not records:
        raise DatasetError(path, None, "the table has no records")
    return records


def _resolve(base: Path, value: str) -> Path:
    candidate = Path(value.strip().replace("\\", "/"))
    return candidate if candidate.is_absolute() else base / candidate


# ---------------------------------------------------------------------------------------------------------
# CBIS-DDSM


def _find_files(root: Path, names: Iterable[str], max_depth: int = 3) -> list[Path]:
    """Files called any of ``names`` (case-insensitive) under ``root``, at most ``max_depth`` levels down."""
    wanted = {name.lower() for name in names}
    found: list[Path] = []
    root_depth = len(root.parts)
    for folder, subfolders, files in os.walk(root):
        if len(Path(folder).parts) - root_depth >= max_depth:
            subfolders[:] = []
        found.extend(Path(folder) / name for name in files if name.lower() in wanted)
    return sorted(found)


class _FolderIndex:
    """Folder names near the top of an image tree, built lazily and once, for resolving case folders."""

    def __init__(self, root: Path, max_depth: int = 3) -> None:
        self.root = root
        self.max_depth = max_depth
        self._folders: dict[str, list[Path]] | None = None

    def lookup(self, name: str) -> list[Path]:
        if self._folders is None:
            self._folders = defaultdict(list)
            root_depth = len(self.root.parts)
            for folder, subfolders, _ in os.walk(self.root):
                depth = len(Path(folder).parts) - root_depth
                for sub in subfolders:
                    self._folders[sub].append(Path(folder) / sub)
                if depth + 1 >= self.max_depth:
                    subfolders[:] = []
        return self._folders.get(name, [])


def _single_image_in(folder: Path, prefer: str) -> list[Path]:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    preferred = [p for p in images if prefer in str(p.relative_to(folder)).lower()]
    return preferred or images


def _resolve_cbis(image_root: Path, csv_value: str, index: _FolderIndex) -> Path | list[Path] | None:
    """Find the image a CBIS-DDSM CSV path means, in the original or the NBIA/TCIA download layout.

    The CSVs name ``<case>/<study uid>/<series uid>/000000.dcm``, but the NBIA retriever writes
    ``<case>/<date-description>/<number-description>/1-1.dcm``; so after the exact path fails, the case folder
    (or any other component of the path) is looked up and its single image taken, preferring "full mammogram".
    Returns the path, a list when the folder holds several candidates, or None when nothing matched.
    """
    relative = csv_value.strip().replace("\\", "/").strip("/")
    exact = image_root / relative
    if exact.is_file():
        return exact
    parts = [part for part in relative.split("/") if part]
    for component in parts[:-1]:
        for folder in index.lookup(component):
            images = _single_image_in(folder, "full mammogram")
            if len(images) == 1:
                return images[0]
            if images:
                return images
    return None


def load_cbis_ddsm(
    root: str | Path,
    *,
    abnormality: Sequence[str] = ("mass",),
    csv_files: Sequence[str | Path] | None = None,
    image_root: str | Path | None = None,
    check_files: bool = True,
) -> list[Record]:
    """Full-field images of CBIS-DDSM with their pathology, one record per image.

    The image label is "malignant" when any of its abnormalities is MALIGNANT, otherwise "benign"
    (BENIGN and BENIGN_WITHOUT_CALLBACK); ``birads`` is the highest ``assessment``.  ``extra["split"]`` is the
    official "train"/"test" split from the table's name, for :func:`official_split`.  ROI masks, whose NBIA
    folder names are ambiguous, are set only when the CSV path exists as written; all of them are listed in
    ``extra["roi_mask_csv_paths"]``.

    :param root: the folder holding the case-description CSVs (and, by default, the images).
    :param abnormality: "mass", "calc" or both.
    :param csv_files: the CSVs to read instead of searching ``root`` for the standard names.
    :param image_root: the folder the CSVs' image paths start from (default: ``root``, or ``root/CBIS-DDSM``).
    :param check_files: raise when an image cannot be found.
    """
    root = Path(root)
    unknown = [kind for kind in abnormality if kind not in CBIS_CSV_NAMES]
    if unknown:
        raise ValueError(f"abnormality {unknown} must be among {sorted(CBIS_CSV_NAMES)}")
    if csv_files is not None:
        tables = [Path(p) for p in csv_files]
    else:
        names = [name for kind in abnormality for name in CBIS_CSV_NAMES[kind]]
        tables = _find_files(root, names)
        if not tables:
            raise DatasetError(
                root, None, f"no CBIS-DDSM case-description CSV found (looked for {', '.join(names)})"
            )
    if image_root is None:
        image_root = root / "CBIS-DDSM" if (root / "CBIS-DDSM").is_dir() else root
    image_root = Path(image_root)
    index = _FolderIndex(image_root)
    resolved_cache: dict[str, Path] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for table in tables:
        header, rows = _read_table(table)
        image_col = _column(header, table, "image file path")
        pathology_col = _column(header, table, "pathology")
        patient_col = _column(header, table, "patient_id", "patient id")
        side_col = _column(header, table, "left or right breast", required=False)
        view_col = _column(header, table, "image view", required=False)
        assessment_col = _column(header, table, "assessment", required=False)
        type_col = _column(header, table, "abnormality type", required=False)
        roi_col = _column(header, table, "roi mask file path", required=False)
        density_col = _column(header, table, "breast density", "breast_density", required=False)
        lower_name = table.name.lower()
        split = "test" if "test" in lower_name else "train" if "train" in lower_name else ""
        for row_number, row in rows:
            image_value = row[image_col or ""]
            if not image_value:
                raise DatasetError(table, row_number, "the image file path is empty")
            pathology = row[pathology_col or ""].upper()
            if pathology not in _CBIS_PATHOLOGY:
                raise DatasetError(
                    table,
                    row_number,
                    f"pathology {row[pathology_col or '']!r} is not one of {sorted(_CBIS_PATHOLOGY)}",
                )
            csv_image = image_value.strip().replace("\\", "/")
            resolved: Path | list[Path] | None = image_root / csv_image
            if check_files:
                resolved = resolved_cache.get(csv_image) or _resolve_cbis(image_root, csv_image, index)
                if resolved is None:
                    raise DatasetError(table, row_number, f"image {csv_image} not found under {image_root}")
                if isinstance(resolved, list):
                    raise DatasetError(
                        table,
                        row_number,
                        f"image {csv_image} is ambiguous under {image_root}: "
                        + ", ".join(map(str, resolved[:4])),
                    )
                resolved_cache[csv_image] = resolved
            # One record per image file: the rows of its abnormalities are merged.
            key = str(resolved)
            entry = grouped.get(key)
            if entry is None:
                entry = grouped[key] = {
                    "path": resolved,
                    "patient": row[patient_col or ""],
                    "labels": [],
                    "birads": [],
                    "extra": {
                        "source": "cbis-ddsm",
                        "table": str(table),
                        "row": row_number,
                        "split": split,
                        "laterality": {"LEFT": "L", "RIGHT": "R"}.get(
                            row.get(side_col or "", "").upper(), ""
                        ),
                        "view": row.get(view_col or "", "").upper(),
                        "density": row.get(density_col or "", ""),
                        "csv_image_path": csv_image,
                        "abnormality_types": [],
                        "pathologies": [],
                        "roi_mask_csv_paths": [],
                    },
                }
            entry["labels"].append(_CBIS_PATHOLOGY[pathology])
            entry["extra"]["pathologies"].append(pathology)
            if type_col and row[type_col]:
                entry["extra"]["abnormality_types"].append(row[type_col])
            if assessment_col and row[assessment_col]:
                entry["birads"].append(_parse_birads(row[assessment_col], table, row_number))
            if roi_col and row[roi_col]:
                entry["extra"]["roi_mask_csv_paths"].append(row[roi_col].strip().replace("\\", "/"))
    records = []
    for entry in grouped.values():
        extra = entry["extra"]
        mask_path = None
        if len(extra["roi_mask_csv_paths"]) == 1 and (image_root / extra["roi_mask_csv_paths"][0]).is_file():
            mask_path = image_root / extra["roi_mask_csv_paths"][0]
        birads_values = [b for b in entry["birads"] if b is not None]
        records.append(
            Record(
                path=Path(entry["path"]),
                label="malignant" if "malignant" in entry["labels"] else "benign",
                birads=max(birads_values) if birads_values else None,
                patient_id=entry["patient"] or None,
                mask_path=mask_path,
                extra=extra,
            )
        )
    if not records:
        raise DatasetError(tables[0], None, "the CBIS-DDSM tables have no records")
    return records


# ---------------------------------------------------------------------------------------------------------
# INbreast


def load_inbreast(
    root: str | Path,
    *,
    table: str | Path | None = None,
    dicom_dir: str | Path | None = None,
    xml_dir: str | Path | None = None,
    malignant_min_birads: int = 4,
    birads1_as_normal: bool = False,
    check_files: bool = True,
) -> list[Record]:
    """INbreast images from its table (``INbreast.xls``, or its CSV export) and ``AllDICOMs/``.

    The table's "Patient ID" column is blank ("removed") in the public release, so the patient is the
    anonymised hash in the DICOM file names (``<File Name>_<hash>_MG_<L|R>_<CC|ML>_ANON.dcm``).  The label is
    "malignant" for BI-RADS >= ``malignant_min_birads`` (4a-c, 5, 6 by default) and "benign" otherwise;
    ``birads`` keeps the category (6 included; a BI-RADS 1-5 model maps 6 to 5).  ``mask_path`` is the
    lesion XML in ``AllXML/`` when it exists (:func:`read_mask` rasterises it).

    The .xls is read with xlrd and an .xlsx with openpyxl (both in the ``ml`` extra); numeric cells read as
    their CSV export writes them ("20586934", not "20586934.0"), so the table and its export agree.

    :param root: the INbreast release folder.
    :param table: the table to read (default: ``INbreast.xls``/``.xlsx``/``.csv`` found under ``root``; a CSV
        is preferred when both exist, since it is what someone exported on purpose and needs no spreadsheet
        library).
    :param dicom_dir: the DICOM folder (default ``root/AllDICOMs``, else ``root``).
    :param xml_dir: the lesion-annotation folder (default ``root/AllXML``).
    :param malignant_min_birads: the lowest BI-RADS category labelled malignant.
    :param birads1_as_normal: label BI-RADS 1 images "normal" instead of "benign".
    :param check_files: raise when a row's DICOM is missing.
    """
    root = Path(root)
    if table is None:
        candidates = _find_files(root, ["INbreast.csv", "INbreast.xls", "INbreast.xlsx"], max_depth=2)
        if not candidates:
            raise DatasetError(
                root, None, "no INbreast table found (looked for INbreast.csv, .xls and .xlsx)"
            )
        candidates.sort(key=lambda p: p.suffix.lower() != ".csv")
        table = candidates[0]
    table = Path(table)
    header, rows = _read_table(table)
    name_col = _column(header, table, "file name", "filename")
    birads_col = _column(header, table, "bi-rads", "birads")
    side_col = _column(header, table, "laterality", required=False)
    view_col = _column(header, table, "view", required=False)
    density_col = _column(header, table, "acr", required=False)
    date_col = _column(header, table, "acquisition date", required=False)
    dicoms = Path(dicom_dir) if dicom_dir else (root / "AllDICOMs" if (root / "AllDICOMs").is_dir() else root)
    xmls = Path(xml_dir) if xml_dir else root / "AllXML"
    by_number: dict[str, Path] = {}
    if dicoms.is_dir():
        for dicom in dicoms.rglob("*.dcm"):
            by_number.setdefault(dicom.name.split("_")[0], dicom)
    records = []
    for row_number, row in rows:
        raw_name = row[name_col or ""].strip()
        side, view = row.get(side_col or "", "").upper(), row.get(view_col or "", "").upper()
        if not raw_name:
            continue
        number = raw_name[:-2] if raw_name.endswith(".0") else raw_name
        if not number.isdigit():
            if side or view:
                raise DatasetError(
                    table, row_number, f"file name {raw_name!r} is not an INbreast image number"
                )
            continue  # footer notes below the table
        birads = _parse_birads(row[birads_col or ""], table, row_number)
        if birads is None:
            raise DatasetError(table, row_number, f"image {number} has no BI-RADS category")
        dicom_path = by_number.get(number)
        if dicom_path is None:
            if check_files:
                raise DatasetError(table, row_number, f"no DICOM named {number}_*.dcm in {dicoms}")
            dicom_path = dicoms / f"{number}.dcm"
        name_parts = dicom_path.name.split("_")
        patient = name_parts[1] if len(name_parts) > 2 else None
        if birads1_as_normal and birads == 1:
            label = "normal"
        else:
            label = "malignant" if birads >= malignant_min_birads else "benign"
        xml_path = xmls / f"{number}.xml"
        records.append(
            Record(
                path=dicom_path,
                label=label,
                birads=birads,
                patient_id=patient,
                mask_path=xml_path if xml_path.is_file() else None,
                extra={
                    "source": "inbreast",
                    "table": str(table),
                    "row": row_number,
                    "birads_raw": row[birads_col or ""],
                    "laterality": side,
                    "view": "MLO" if view == "ML" else view,
                    "density": row.get(density_col or "", ""),
                    "acquisition_date": row.get(date_col or "", ""),
                },
            )
        )
    if not records:
        raise DatasetError(table, None, "the INbreast table has no image rows")
    return records


def inbreast_xml_mask(
    xml_path: str | Path,
    shape: tuple[int, int],
    *,
    roi_names: Sequence[str] | None = None,
    point_radius: int = 3,
) -> np.ndarray:
    """Rasterise the ROIs of an INbreast annotation (an Apple plist) into a boolean mask.

    :param xml_path: ``AllXML/<File Name>.xml``.
    :param shape: (rows, columns) of the image.
    :param roi_names: keep only ROIs with these names (e.g. ("Mass",)); all by default.
    :param point_radius: radius of the disc drawn for single-point ROIs (calcifications).
    """
    path = Path(xml_path)
    try:
        with path.open("rb") as handle:
            document = plistlib.load(handle)
    except (OSError, plistlib.InvalidFileException, ValueError) as error:
        raise DatasetError(path, None, f"cannot parse the INbreast annotation: {error}") from error
    mask = np.zeros(shape, dtype=np.uint8)
    wanted = {name.lower() for name in roi_names} if roi_names else None
    for image in document.get("Images", []) if isinstance(document, dict) else []:
        for roi in image.get("ROIs", []):
            if wanted is not None and str(roi.get("Name", "")).lower() not in wanted:
                continue
            points = []
            for text in roi.get("Point_px", []):
                numbers = re.findall(r"-?\d+(?:\.\d+)?", str(text))
                if len(numbers) >= 2:
                    points.append((float(numbers[0]), float(numbers[1])))
            if len(points) >= 3:
                polygon = np.round(np.array(points)).astype(np.int32)
                cv2.fillPoly(mask, [polygon], 1)
            elif points:
                for x, y in points:
                    cv2.circle(mask, (round(x), round(y)), point_radius, 1, -1)
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------------------------
# MIAS


def load_mias(
    root: str | Path,
    *,
    info_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    normal_as_benign: bool = False,
    check_files: bool = True,
) -> list[Record]:
    """MIAS images from ``Info.txt`` (refnum, tissue, class, severity, x, y, radius) and the PGM files.

    One record per image: "malignant" if any abnormality has severity M, "benign" if any has B, "normal" for
    NORM (or "benign" with ``normal_as_benign``, as the ASG-MammoNet paper merged them).  Abnormalities go to
    ``extra["abnormalities"]`` with the file's coordinates (origin at the bottom-left corner);
    :func:`mias_mask` draws them.  MIAS stores the left and right films of one woman as consecutive
    numbers (mdb001/mdb002, ...), which gives the patient identity.

    :param root: the MIAS folder.
    :param info_file: the info file (default: ``Info.txt`` found under ``root``, any case).
    :param image_dir: the folder of ``mdbNNN.pgm`` (default: ``root``; searched recursively).
    :param normal_as_benign: label normal images "benign".
    :param check_files: raise when an image is missing.
    """
    root = Path(root)
    if info_file is None:
        found = _find_files(root, ["Info.txt"], max_depth=2)
        if not found:
            raise DatasetError(root, None, "no MIAS Info.txt found")
        info_file = found[0]
    info = Path(info_file)
    try:
        lines = info.read_text(encoding="latin-1").splitlines()
    except OSError as error:
        raise DatasetError(info, None, f"cannot read the info file: {error.strerror or error}") from error
    images_root = Path(image_dir) if image_dir else root
    by_name: dict[str, Path] = {}
    for candidate in images_root.rglob("mdb*"):
        if candidate.suffix.lower() in (".pgm", ".png", ".tif", ".tiff", ".jpg"):
            by_name.setdefault(candidate.stem.lower(), candidate)
    entries: dict[str, dict[str, Any]] = {}
    for line_number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or not re.fullmatch(r"mdb\d{3}", tokens[0].lower()):
            continue  # headers and notes
        refnum = tokens[0].lower()
        if len(tokens) < 3:
            raise DatasetError(info, line_number, f"{refnum} has {len(tokens)} fields; expected at least 3")
        tissue, kind = tokens[1].upper(), tokens[2].upper()
        if tissue not in _MIAS_TISSUE:
            raise DatasetError(
                info, line_number, f"{refnum}: background tissue {tokens[1]!r} is not F, G or D"
            )
        if kind not in _MIAS_CLASSES:
            raise DatasetError(
                info, line_number, f"{refnum}: class {tokens[2]!r} is not one of {sorted(_MIAS_CLASSES)}"
            )
        severity = tokens[3].upper() if len(tokens) > 3 else ""
        if kind != "NORM" and severity not in ("B", "M"):
            raise DatasetError(
                info, line_number, f"{refnum}: severity {severity or '(missing)'!r} is not B or M"
            )
        coordinates: list[float | None] = []
        note = ""
        for position, token in enumerate(tokens[4:]):
            if token.startswith("*"):
                # "* *NOTE 3*": the file's footnote markers; whatever follows is the note, not a coordinate.
                note = " ".join(t for t in tokens[4 + position :] if t != "*")
                coordinates += [None] * sum(1 for t in tokens[4 + position :] if t == "*")
                break
            if len(coordinates) == 3:
                raise DatasetError(
                    info, line_number, f"{refnum}: unexpected field {token!r} after x, y, radius"
                )
            try:
                coordinates.append(float(token))
            except ValueError:
                raise DatasetError(
                    info, line_number, f"{refnum}: coordinate {token!r} is not a number"
                ) from None
        coordinates = (coordinates + [None] * 3)[:3]
        entry = entries.setdefault(
            refnum, {"line": line_number, "tissue": _MIAS_TISSUE[tissue], "abnormalities": []}
        )
        if kind != "NORM":
            x, y, radius = coordinates
            entry["abnormalities"].append(
                {"class": kind, "severity": severity, "x": x, "y": y, "radius": radius, "note": note}
            )
    records = []
    for refnum, entry in entries.items():
        severities = {a["severity"] for a in entry["abnormalities"]}
        label = "malignant" if "M" in severities else "benign" if "B" in severities else "normal"
        if label == "normal" and normal_as_benign:
            label = "benign"
        image_path = by_name.get(refnum)
        if image_path is None:
            if check_files:
                raise DatasetError(info, entry["line"], f"image {refnum}.pgm not found under {images_root}")
            image_path = images_root / f"{refnum}.pgm"
        number = int(refnum[3:])
        records.append(
            Record(
                path=image_path,
                label=label,
                patient_id=f"mias{(number + 1) // 2:03d}",
                extra={
                    "source": "mias",
                    "table": str(info),
                    "row": entry["line"],
                    "tissue": entry["tissue"],
                    "abnormalities": entry["abnormalities"],
                    "coordinates_origin": "bottom-left",
                },
            )
        )
    if not records:
        raise DatasetError(info, None, "the info file has no mdbNNN records")
    return records


def mias_mask(record: Record, shape: tuple[int, int]) -> np.ndarray:
    """Discs of the MIAS abnormalities of ``record`` (x, y from the bottom-left corner) as a boolean mask.

    :param record: a record from :func:`load_mias`.
    :param shape: (rows, columns) of the image (1024 x 1024 in MIAS).
    """
    mask = np.zeros(shape, dtype=np.uint8)
    for abnormality in record.extra.get("abnormalities", []):
        x, y, radius = abnormality["x"], abnormality["y"], abnormality["radius"]
        if x is None or y is None or radius is None:
            continue
        cv2.circle(mask, (round(x), round(shape[0] - 1 - y)), max(1, round(radius)), 1, -1)
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------------------------
# BUSI


def load_busi(
    root: str | Path, *, classes: Sequence[str] = BUSI_CLASSES, check_files: bool = True
) -> list[Record]:
    """BUSI ultrasound images from its class folders (``benign/``, ``malignant/``, ``normal/``).

    The mask of ``benign (1).png`` is ``benign (1)_mask.png``; further masks of the same image
    (``_mask_1.png`` ...) are listed in ``extra["extra_masks"]``.  BUSI has no patient identity, so every
    image is its own split group (and its near-duplicates can leak; docs/models/us-fusion.md warns about this).

    :param root: ``Dataset_BUSI_with_GT`` or the folder above it.
    :param classes: the class folders to read.
    :param check_files: raise when a requested class folder is missing or empty.
    """
    root = Path(root)
    if not any((root / name).is_dir() for name in classes) and (root / "Dataset_BUSI_with_GT").is_dir():
        root = root / "Dataset_BUSI_with_GT"
    folders = (
        {entry.name.lower(): entry for entry in root.iterdir() if entry.is_dir()} if root.is_dir() else {}
    )
    records = []
    for class_name in classes:
        folder = folders.get(class_name.lower())
        if folder is None:
            if check_files:
                raise DatasetError(
                    root, None, f"no {class_name!r} class folder (found: {sorted(folders) or 'none'})"
                )
            continue
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg")
        )
        masks: dict[str, list[Path]] = defaultdict(list)
        images = []
        for file in files:
            match = re.fullmatch(r"(.*)_mask(?:_(\d+))?", file.stem)
            if match:
                masks[match.group(1)].append(file)
            else:
                images.append(file)
        if not images and check_files:
            raise DatasetError(folder, None, "the class folder has no images")
        for image in images:
            image_masks = sorted(masks.get(image.stem, []), key=lambda p: (len(p.stem), p.stem))
            records.append(
                Record(
                    path=image,
                    label=class_name.lower(),
                    mask_path=image_masks[0] if image_masks else None,
                    extra={"source": "busi", "extra_masks": [str(p) for p in image_masks[1:]]},
                )
            )
    if not records:
        raise DatasetError(root, None, "no BUSI images found")
    return records


# ---------------------------------------------------------------------------------------------------------
# Masks


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a lesion mask as a boolean array from a PNG/JPEG, a DICOM (CBIS-DDSM ROI) or an INbreast XML.

    :param path: the mask file.
    :param shape: (rows, columns) of the image; required for INbreast XML, checked for the others.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".xml":
        if shape is None:
            raise ValueError(f"reading {path} needs the image shape (an INbreast XML has only polygons)")
        return inbreast_xml_mask(path, shape)
    if suffix in (".dcm", ".dicom"):
        import pydicom

        try:
            array: np.ndarray = pydicom.dcmread(path).pixel_array
        except Exception as error:  # pydicom raises several types for unreadable files
            raise DatasetError(path, None, f"cannot read the DICOM mask: {error}") from error
    else:
        loaded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if loaded is None:
            raise DatasetError(path, None, "cannot read the mask image")
        array = np.asarray(loaded)
    if array.ndim == 3:
        array = array.max(axis=2)
    mask = np.asarray(array) > 0
    if shape is not None and mask.shape != tuple(shape):
        raise DatasetError(path, None, f"mask shape {mask.shape} differs from the image shape {tuple(shape)}")
    return mask


# ---------------------------------------------------------------------------------------------------------
# Splits


def patient_groups(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Group records by :attr:`Record.group` (the patient, or the image itself when it is unknown)."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.group].append(record)
    return dict(groups)


def _stratum(group: Sequence[Record], overall: Counter[str]) -> str:
    """Return the label a group is stratified by: its most common one, ties going to the rarer overall."""
    counts = Counter(r.label for r in group)
    return min(counts, key=lambda label: (-counts[label], overall[label], label))


def _assign_groups(
    records: Sequence[Record], fractions: Sequence[float], seed: int, stratify: bool
) -> list[int]:
    """Part index per record: whole groups, greedily per stratum, so each part nears its image share."""
    if any(f < 0 or not math.isfinite(f) for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions {list(fractions)} must be non-negative with a positive sum")
    weights = np.asarray(fractions, dtype=float) / float(sum(fractions))
    groups = patient_groups(records)
    overall = Counter(r.label for r in records)
    strata: dict[str, list[str]] = defaultdict(list)
    for key in sorted(groups):
        strata[_stratum(groups[key], overall) if stratify else ""].append(key)
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    for stratum in sorted(strata):
        keys = strata[stratum]
        order = rng.permutation(len(keys))
        # Largest groups first (stable within the shuffle) pack better against the targets.
        shuffled = sorted((keys[i] for i in order), key=lambda k: -len(groups[k]))
        total = sum(len(groups[k]) for k in keys)
        filled = np.zeros(len(weights))
        for key in shuffled:
            deficit = weights * total - filled
            # Ties go to the larger part, then to the earlier one.
            part = int(max(range(len(weights)), key=lambda i: (deficit[i], weights[i], -i)))
            assignment[key] = part
            filled[part] += len(groups[key])
    return [assignment[r.group] for r in records]


def split_records(
    records: Sequence[Record],
    fractions: Mapping[str, float] | None = None,
    *,
    seed: int = 42,
    stratify: bool = True,
) -> dict[str, list[Record]]:
    """Split by patient into named parts (default train/val/test = 0.7/0.15/0.15), stratified by label.

    Every patient's images land in one part; records keep their input order within a part.  The result
    depends only on the records and the seed, not on the order of ``records``.

    :param records: the records to split.
    :param fractions: part name -> share of the images (normalised to sum 1); a 0 share gives an empty part.
    :param seed: the split's seed.
    :param stratify: keep each label's share close to ``fractions`` in every part.
    """
    fractions = dict(fractions) if fractions is not None else {"train": 0.7, "val": 0.15, "test": 0.15}
    names = list(fractions)
    parts = _assign_groups(records, [fractions[n] for n in names], seed, stratify)
    result: dict[str, list[Record]] = {name: [] for name in names}
    for record, part in zip(records, parts, strict=True):
        result[names[part]].append(record)
    return result


def kfold_records(
    records: Sequence[Record], k: int = 5, *, seed: int = 42, stratify: bool = True
) -> list[tuple[list[Record], list[Record]]]:
    """``k`` (train, test) folds by patient, stratified by label; each record is in exactly one test fold.

    :param records: the records to split.
    :param k: number of folds (at least 2).
    :param seed: the folds' seed.
    :param stratify: keep each label's share close to 1/k in every fold.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, not {k}")
    n_groups = len(patient_groups(records))
    if n_groups < k:
        raise ValueError(
            f"{k} folds need at least {k} patients (or images without a patient); there are {n_groups}"
        )
    parts = _assign_groups(records, [1.0] * k, seed, stratify)
    return [
        (
            [r for r, p in zip(records, parts, strict=True) if p != fold],
            [r for r, p in zip(records, parts, strict=True) if p == fold],
        )
        for fold in range(k)
    ]


def official_split(records: Sequence[Record], key: str = "split") -> dict[str, list[Record]]:
    """Group records by their ``extra[key]`` (e.g. CBIS-DDSM's official train/test); raise if one lacks it.

    :param records: the records.
    :param key: the ``extra`` field that names the part.
    """
    result: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        part = record.extra.get(key)
        if not part:
            raise ValueError(f"{record.path} has no extra[{key!r}], so there is no official split to follow")
        result[str(part)].append(record)
    return dict(result)


def assert_no_patient_leak(parts: Mapping[str, Sequence[Record]]) -> None:
    """Raise :class:`ValueError` naming the patient if one patient (or one image) is in two parts.

    :param parts: part name -> records, e.g. the result of :func:`split_records`.
    """
    seen: dict[str, str] = {}
    for name, records in parts.items():
        for record in records:
            other = seen.setdefault(record.group, name)
            if other != name:
                raise ValueError(f"{record.group} is in both the {other!r} and the {name!r} part")


# ---------------------------------------------------------------------------------------------------------
# Description


def describe_records(records: Sequence[Record]) -> dict[str, Any]:
    """Count images, patients, labels and masks, for a checkpoint's or report's data description (JSON).

    :param records: the records.
    """
    known = {r.patient_id for r in records if r.patient_id}
    return {
        "images": len(records),
        "patients": len(known),
        "images_without_patient": sum(1 for r in records if not r.patient_id),
        "labels": dict(sorted(Counter(r.label for r in records).items())),
        "birads": {
            str(k): v for k, v in sorted(Counter(r.birads for r in records if r.birads is not None).items())
        },
        "with_mask": sum(1 for r in records if r.mask_path is not None),
        "sources": dict(sorted(Counter(str(r.extra.get("source", "")) for r in records).items())),
    }


def dataset_fingerprint(records: Sequence[Record], *, hash_files: bool = False) -> str:
    """sha256 of the records (paths relative to their common folder, labels, BI-RADS, patients, masks).

    The digest does not depend on the order of ``records`` or on where the data set is mounted.

    :param records: the records.
    :param hash_files: also hash every image's bytes (slow for large sets, but detects changed pixels).
    """
    if not records:
        raise ValueError("cannot fingerprint an empty record list")
    paths = [str(r.path.resolve()) for r in records]
    common = os.path.commonpath(paths) if len(paths) > 1 else str(Path(paths[0]).parent)
    lines = []
    for record, absolute in zip(records, paths, strict=True):
        relative = Path(os.path.relpath(absolute, common)).as_posix()
        mask = (
            Path(os.path.relpath(str(record.mask_path.resolve()), common)).as_posix()
            if record.mask_path
            else ""
        )
        content = ""
        if hash_files:
            digest = hashlib.sha256()
            with record.path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            content = digest.hexdigest()
        lines.append(
            "\t".join(
                [relative, record.label, str(record.birads or ""), record.patient_id or "", mask, content]
            )
        )
    return hashlib.sha256("\n".join(sorted(lines)).encode("utf-8")).hexdigest()
