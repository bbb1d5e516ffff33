"""Superseding earlier results with an IHE IOCM rejection KOS: the document itself (dciodvfy, content,
deterministic UIDs), what Orthanc does with it, and a second study version superseding the first
through the worker."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.messages import InstanceRef, Priority, StudyJob
from gateway.settings import load_settings
from tests.peers import Orthanc
from tests.test_delivery import destination_of, study_outputs
from tests.test_outputs import _dciodvfy
from tests.test_triage_order import BUILTIN_MODELS, brightness_instance, start_worker, stop
from tests.test_worker_reliability import _config
from tests.utils import wait_for, write
from workers.pacs import deliver
from workers.supersede import KOS_SOP_CLASS_UID, SupersededOutput, rejection_kos


def _superseded(datasets: list[Dataset]) -> list[SupersededOutput]:
    return [
        SupersededOutput(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
        )
        for ds in datasets
    ]


def _rejected_uids(kos: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if "ReferencedSOPSequence" in item
    }


def test_the_kos_is_an_iocm_rejection_of_exactly_the_superseded_outputs(tmp_path: Path) -> None:
    objects, _ = study_outputs()
    kos = rejection_kos(_superseded(objects), objects[0])
    assert kos.SOPClassUID == KOS_SOP_CLASS_UID and kos.Modality == "KO"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")  # CID 7011
    assert _rejected_uids(kos) == {str(ds.SOPInstanceUID) for ds in objects}
    (evidence,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == objects[0].StudyInstanceUID
    assert {s.SeriesInstanceUID for s in evidence.ReferencedSeriesSequence} == {
        ds.SeriesInstanceUID for ds in objects
    }
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert kos.get(keyword) == objects[0].get(keyword)
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    errors, _ = _dciodvfy(path)
    assert errors == []
    again = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    assert again.SOPInstanceUID == kos.SOPInstanceUID


def test_the_kos_uids_depend_only_on_the_study_and_the_rejected_instances() -> None:
    objects, _ = study_outputs()
    first = rejection_kos(_superseded(objects), objects[0])
    reordered = rejection_kos(_superseded(objects[::-1]), objects[1])
    fewer = rejection_kos(_superseded(objects[:1]), objects[0])
    assert first.SOPInstanceUID == reordered.SOPInstanceUID
    assert first.SeriesInstanceUID == reordered.SeriesInstanceUID == fewer.SeriesInstanceUID
    assert fewer.SOPInstanceUID != first.SOPInstanceUID


def test_nothing_to_reject_is_an_error() -> None:
    objects, _ = study_outputs()
    with pytest.raises(ValueError, match="no superseded output"):
        rejection_kos([], objects[0])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield peer
    finally:
        peer.stop()


@pytest.mark.peers
def test_orthanc_stores_the_kos_and_keeps_the_rejected_instances(orthanc: Orthanc) -> None:
    """Orthanc (1.10) has no IOCM: the KOS is one more instance of the study, and the instances it
    rejects stay stored and listed.  docs/outputs.md records this."""
    objects, _ = study_outputs()
    destination = destination_of(orthanc)
    assert all(r.ok for r in deliver(objects, destination, timeout=20))
    kos = rejection_kos(_superseded(objects), objects[0])
    (result,) = deliver([kos], destination, timeout=20)
    assert result.ok
    kos_id = orthanc.find_instance(str(kos.SOPInstanceUID))
    assert kos_id is not None
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(kos_id)))
    assert stored.SOPClassUID == KOS_SOP_CLASS_UID
    assert _rejected_uids(stored) == {str(ds.SOPInstanceUID) for ds in objects}
    assert all(orthanc.find_instance(str(ds.SOPInstanceUID)) is not None for ds in objects)


# ---------------------------------------------------------------------------------------- through the worker


def _version(tmp_path: Path, images: list[Dataset], version: int) -> StudyJob:
    refs = []
    for ds in images:
        path = write(ds, tmp_path / "store")
        refs.append(
            InstanceRef(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                modality="MG",
                path=path.name,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
        )
    return StudyJob(
        job_id=f"study-v{version}",
        study_instance_uid=str(images[0].StudyInstanceUID),
        study_version=version,
        calling_ae="MODALITY",
        priority=Priority.ROUTINE,
        storage_root=str(tmp_path / "store"),
        instances=tuple(refs),
    )


@pytest.mark.redis
@pytest.mark.peers
@pytest.mark.slow
def test_a_second_study_version_supersedes_the_first_results(
    tmp_path: Path, redis_url: str, orthanc: Orthanc
) -> None:
    from workers.app import configure_app
    from workers.dispatch import CeleryDispatcher
    from workers.results import ResultsStore

    config = _config(
        tmp_path,
        redis_url,
        plugins={
            "drop_in_dir": str(Path(__file__).parent / "triage_plugins"),
            "load_entrypoints": False,
            "disabled": BUILTIN_MODELS,
            "allow_demo_weights": True,
            "models": {"triage_probe_heavy": {"enabled": False}},
        },
        triage={"first_stage_model": "triage_probe"},
        delivery={
            "destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
            "supersede": True,
        },
    )
    settings = load_settings(config, environ={})
    dispatcher = CeleryDispatcher(configure_app(settings))
    first = brightness_instance(bright=False, seed=11)
    second = brightness_instance(bright=True, seed=12)
    for keyword in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
    ):
        if keyword in first:
            setattr(second, keyword, first.data_element(keyword).value)
    results = ResultsStore(tmp_path / "data" / "results.sqlite")
    worker = start_worker(config, "analysis,delivery", tmp_path / "worker.log")

    def outputs_of(job_id: str) -> set[str]:
        return {Path(p).stem for a in results.analyses(job_id) for p in json.loads(a["outputs"])}

    try:
        dispatcher.dispatch(_version(tmp_path, [first], 1))
        wait_for(
            lambda: (results.study(str(first.StudyInstanceUID)) or {"state": ""})["state"] == "delivered",
            timeout=180,
            interval=0.5,
        )
        dispatcher.dispatch(_version(tmp_path, [first, second], 2))
        wait_for(
            lambda: any(e["event"] == "superseded" for e in results.timeline("study-v2")),
            timeout=180,
            interval=0.5,
        )
    finally:
        stop(worker)
    old, new = outputs_of("study-v1"), outputs_of("study-v2")
    replaced = old - new
    assert replaced and old & new  # the SR is new; the first image's heatmap is the same instance
    kos_ids = [
        i
        for i in orthanc.instances()
        if orthanc.get_json(f"/instances/{i}/simplified-tags").get("SOPClassUID") == KOS_SOP_CLASS_UID
        and orthanc.get_json(f"/instances/{i}/simplified-tags").get("StudyInstanceUID")
        == str(first.StudyInstanceUID)
    ]
    (kos_id,) = kos_ids
    kos = pydicom.dcmread(io.BytesIO(orthanc.instance_file(kos_id)))
    assert _rejected_uids(kos) == replaced
    assert all(orthanc.find_instance(uid) is not None for uid in new)
