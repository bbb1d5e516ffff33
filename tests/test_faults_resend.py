"""Resends: the same study in full is kept once and adds nothing to the PACS; a study resent with one series
changed becomes a new version whose changed outputs reach the PACS under new UIDs, the unchanged ones once."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.faults_harness import Pipeline, orthanc_study_instances, phi_study

pytestmark = [pytest.mark.redis, pytest.mark.peers]


def _two_series_study(number: int) -> list[Dataset]:
    """A 4-view study with the CC views in one series and the MLO views in another."""
    study = phi_study(number, seed=number)
    mlo_series = generate_uid()
    for ds in study:
        if ds.ViewPosition == "MLO":
            ds.SeriesInstanceUID = mlo_series
            ds.SeriesNumber = 2
    return study


def _outputs_by_job(pipeline: Pipeline, study_uid: str) -> dict[int, dict[str, set[str]]]:
    """Version -> {"SR": uids, "SC <source uid>": uids} from the workers' journal."""
    import json

    with pipeline.journal() as gw:
        jobs = {
            int(v): j
            for v, j in gw.execute("SELECT version, job_id FROM studies WHERE study_uid = ?", (study_uid,))
        }
    found: dict[int, dict[str, set[str]]] = {}
    with pipeline.results() as db:
        for version, job in jobs.items():
            for (outputs,) in db.execute("SELECT outputs FROM analyses WHERE job_id = ?", (job,)):
                found[version] = {"all": {Path(p).stem for p in json.loads(outputs)}}
    return found


@pytest.mark.slow
def test_same_study_resent_in_full_adds_nothing(tmp_path: Path) -> None:
    with Pipeline(tmp_path) as pipeline:
        pipeline.start_gateway()
        pipeline.start_worker()
        study = phi_study(40)
        uid = str(study[0].StudyInstanceUID)
        pipeline.send(study)
        pipeline.wait_settled([uid], timeout=60)
        first = sorted(orthanc_study_instances(pipeline.orthanc, uid))  # type: ignore[arg-type]

        pipeline.send(study, associations=2)  # the same bytes again, over two associations
        time.sleep(4)  # several quiet times: a new version would have completed and been queued by now
        with pipeline.journal() as gw:
            rows = gw.execute(
                "SELECT version, duplicates FROM studies WHERE study_uid = ?", (uid,)
            ).fetchall()
        assert [tuple(r) for r in rows] == [(1, 4)]  # kept once, counted as duplicates, no new version
        assert sorted(orthanc_study_instances(pipeline.orthanc, uid)) == first  # type: ignore[arg-type]
        pipeline.check_invariant()


@pytest.mark.slow
def test_study_resent_with_one_series_changed_gets_new_outputs(tmp_path: Path) -> None:
    with Pipeline(tmp_path) as pipeline:
        pipeline.start_gateway()
        pipeline.start_worker()
        study = _two_series_study(41)
        uid = str(study[0].StudyInstanceUID)
        pipeline.send(study)
        pipeline.wait_settled([uid], timeout=60)
        v1 = set(orthanc_study_instances(pipeline.orthanc, uid))  # type: ignore[arg-type]
        assert len(v1) == 6  # the study SR, the Mammography CAD SR and four heatmaps

        # The MLO series again, same UIDs, new pixels (reprocessed at the modality): version 2.
        rng = np.random.default_rng(7)
        changed = [ds for ds in study if ds.ViewPosition == "MLO"]
        for ds in changed:
            ds.PixelData = rng.integers(0, 4096, (ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
        pipeline.send(changed)
        pipeline.wait_settled([uid], timeout=60)
        v2 = set(orthanc_study_instances(pipeline.orthanc, uid))  # type: ignore[arg-type]
        # A new SR, a new CAD SR and new heatmaps for the two changed images; the unchanged CC heatmaps stay as
        # they were.
        assert v1 < v2 and len(v2 - v1) == 4, f"{len(v2 - v1)} new objects in the PACS"
        outputs = _outputs_by_job(pipeline, uid)
        assert len(outputs[1]["all"] & outputs[2]["all"]) == 2

        # A series with new instance UIDs added to the study: version 3, new SR, heatmaps for the new images.
        extra = _two_series_study(42)[:2]
        for ds in extra:
            ds.StudyInstanceUID = uid
            ds.SeriesInstanceUID = generate_uid()
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = (
                study[0].PatientName,
                study[0].PatientID,
                study[0].PatientBirthDate,
            )
        pipeline.send(extra)
        pipeline.wait_settled([uid], timeout=60)
        v3 = set(orthanc_study_instances(pipeline.orthanc, uid))  # type: ignore[arg-type]
        assert v2 < v3 and len(v3 - v2) == 4  # a new SR and CAD SR, heatmaps for the two new images
        pipeline.check_invariant()
        with pipeline.journal() as gw:
            versions = [
                r[0] for r in gw.execute("SELECT version FROM studies WHERE study_uid = ? ORDER BY 1", (uid,))
            ]
        assert versions == [1, 2, 3]
