"""The reading room end to end (issue 14, "Done when"), every peer real and started here:

DCMTK ``storescu`` -> the gateway (its SCP) -> Celery workers on a private Redis -> Orthanc, which keeps
our results under Storage Commitment, and a RIS (python-hl7's MLLP server) that takes the triage flag.

Two routine mammograms go in first; once their analysis is done, a bright 4-view mammogram follows,
and the brightness-scoring test model (``tests/triage_plugins``) triages it high.  The delivery queue
is consumed only after all three are analysed, so the routine studies' results and ORUs are already
waiting when the high-risk study's are queued: its ORU must reach the RIS first.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.settings import load_settings
from tests.conftest import require_binary
from tests.peers import MllpListener, Orthanc, get_free_port, running_orthanc
from tests.test_commitment import OUR_AE, register_modality
from tests.test_triage_order import BUILTIN_MODELS, REPO, start_worker, stop
from tests.utils import make_instance, wait_for
from workers.results import COMMITTED, ResultsStore

pytestmark = pytest.mark.timeout(480)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
#: Secondary Capture Image Storage and its multi-frame variants (1.2.840.10008.5.1.4.1.1.7.x).
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
IMAGING_MEASUREMENT_REPORT = "126000"  # TID 1500 root concept (DCM)
MAMMOGRAPHY_CAD_REPORT = "111036"  # TID 4000 root concept (DCM)
HIGH_RISK_THRESHOLD = 0.7
FOUR_VIEWS = [(laterality, view) for laterality in ("L", "R") for view in ("CC", "MLO")]


def mammogram_view(
    study_uid: str, series_uid: str, accession: str, *, laterality: str, view: str, bright: bool, seed: int
) -> Dataset:
    """One small MG view whose mean brightness the triage probe models read as its risk."""
    ds = make_instance(
        study_uid=study_uid,
        series_uid=series_uid,
        laterality=laterality,
        view=view,
        rows=48,
        cols=32,
        seed=seed,
        patient_id=f"PAT-{accession}",
    )
    ds.AccessionNumber = accession
    low, high = (3600, 4095) if bright else (0, 400)
    ds.PixelData = np.random.default_rng(seed).integers(low, high, (48, 32), dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.BitsStored, ds.HighBit = 12, 11
    return ds


def write_config(
    tmp_path: Path, gateway_port: int, report_port: int, orthanc: Orthanc, ris_port: int, redis_url: str
) -> Path:
    config = tmp_path / "reading-room.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"port": gateway_port, "host": "127.0.0.1", "data_dir": str(tmp_path / "data")},
                "assembly": {"quiet_seconds": 2.0, "tick_seconds": 0.2},
                "broker": {"url": redis_url},
                "dispatch": {"kind": "celery"},
                "logging": {"level": "INFO", "json_output": True},
                "plugins": {
                    "drop_in_dir": str(REPO / "tests" / "triage_plugins"),
                    "load_entrypoints": False,
                    "disabled": BUILTIN_MODELS,
                    "allow_demo_weights": True,
                },
                "triage": {"first_stage_model": "triage_probe", "high_risk_threshold": HIGH_RISK_THRESHOLD},
                "delivery": {
                    "ae_title": OUR_AE,
                    "commitment_port": report_port,
                    "destinations": [
                        {
                            "ae_title": orthanc.aet,
                            "host": "127.0.0.1",
                            "port": orthanc.dicom_port,
                            "storage_commitment": True,
                            "commitment_timeout_seconds": 30,
                        }
                    ],
                },
                "notifications": {
                    "hl7": [{"name": "ris", "host": "127.0.0.1", "port": ris_port, "timeout_seconds": 30}],
                    "notify": "all",
                },
            }
        )
    )
    return config


def storescu(port: int, directory: Path) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    subprocess.run(
        [
            "storescu",
            "-aec",
            "PACS_TRIAGE",
            "-aet",
            "MODALITY",
            "+sd",
            "127.0.0.1",
            str(port),
            str(directory),
        ],
        check=True,
        env=env,
        timeout=120,
        capture_output=True,
    )


def save_all(datasets: list[Dataset], directory: Path) -> None:
    directory.mkdir(parents=True)
    for ds in datasets:
        ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def walk(item: Dataset) -> Iterator[Dataset]:
    yield item
    for child in item.get("ContentSequence", []):
        yield from walk(child)


def referenced_images(document: Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for leaf in walk(document)
        if leaf.get("ValueType") == "IMAGE"
        for ref in leaf.ReferencedSOPSequence
    }


def job_of(results: ResultsStore, study_uid: str) -> str:
    row = results.study(study_uid)
    assert row is not None, "the study is on the worklist"
    return str(row["job_id"])


def stored_outputs(orthanc: Orthanc, study_uid: str) -> list[Dataset]:
    """Every instance Orthanc holds in *study_uid*, read back from its REST API."""
    found: list[Dataset] = []
    for orthanc_id in orthanc.instances():
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        if ds.StudyInstanceUID == study_uid:
            found.append(ds)
    return found


@pytest.mark.redis
@pytest.mark.peers
@pytest.mark.slow
def test_the_reading_room_gets_committed_results_and_the_high_risk_flag_first(
    tmp_path: Path, redis_url: str
) -> None:
    from workers.http import OpsData

    require_binary("storescu")
    gateway_port, report_port = get_free_port(), get_free_port()
    routine = [
        [
            mammogram_view(
                generate_uid(), generate_uid(), f"ROUT{i}", laterality="L", view="CC", bright=False, seed=i
            )
        ]
        for i in range(2)
    ]
    mg_study_uid, mg_series = generate_uid(), generate_uid()
    mammogram = [
        mammogram_view(mg_study_uid, mg_series, "HIGH1", laterality=lat, view=view, bright=True, seed=10 + n)
        for n, (lat, view) in enumerate(FOUR_VIEWS)
    ]
    save_all([ds for study in routine for ds in study], tmp_path / "send-routine")
    save_all(mammogram, tmp_path / "send-mammogram")
    routine_uids = [str(study[0].StudyInstanceUID) for study in routine]

    with running_orthanc(tmp_path / "orthanc") as orthanc, MllpListener("AA") as ris:
        register_modality(orthanc, OUR_AE, report_port)
        config = write_config(tmp_path, gateway_port, report_port, orthanc, ris.port, redis_url)
        settings = load_settings(config, environ={})
        results = ResultsStore(tmp_path / "data" / "results.sqlite")
        log = tmp_path / "processes.log"
        with log.open("ab") as out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "gateway", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        analysis = start_worker(config, "analysis", log)
        delivery = None

        def analysed(study_uids: list[str]) -> bool:
            rows = [results.study(uid) for uid in study_uids]
            return all(row is not None and row["state"] == "analysed" for row in rows)

        try:
            wait_for(
                lambda: (
                    subprocess.run(
                        ["echoscu", "-aec", "PACS_TRIAGE", "127.0.0.1", str(gateway_port)],
                        capture_output=True,
                    ).returncode
                    == 0
                ),
                timeout=60,
                interval=0.5,
            )
            storescu(gateway_port, tmp_path / "send-routine")
            wait_for(lambda: analysed(routine_uids), timeout=180, interval=0.5)
            storescu(gateway_port, tmp_path / "send-mammogram")
            wait_for(lambda: analysed([mg_study_uid]), timeout=180, interval=0.5)
            stop(analysis)
            assert ris.received == [], "nothing consumed the delivery queue yet"

            delivery = start_worker(config, "delivery", log)
            jobs = {uid: job_of(results, uid) for uid in [*routine_uids, mg_study_uid]}

            def notified_and_committed() -> bool:
                notified = results.notified_endpoints()
                return all(
                    notified.get(job) == ["ris"]
                    and any(e["event"] == COMMITTED for e in results.timeline(job))
                    for job in jobs.values()
                )

            wait_for(notified_and_committed, timeout=240, interval=0.5)
        finally:
            for process in (delivery, analysis, gateway):
                if process is not None:
                    stop(process)

        # --- the PACS: the study SR, the heatmap series and the Mammography CAD SR, every one committed
        mg_job = jobs[mg_study_uid]
        view_uids = {str(ds.SOPInstanceUID) for ds in mammogram}
        stored = stored_outputs(orthanc, mg_study_uid)
        by_class: dict[str, list[Dataset]] = {}
        for ds in stored:
            by_class.setdefault(str(ds.SOPClassUID), []).append(ds)

        (study_sr,) = by_class.get(COMPREHENSIVE_SR, [])
        assert study_sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert study_sr.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENT_REPORT
        assert (
            hd.sr.ComprehensiveSR.from_dataset(study_sr, copy=False).SOPInstanceUID == study_sr.SOPInstanceUID
        )

        heatmaps = [ds for ds in stored if str(ds.SOPClassUID).startswith(SECONDARY_CAPTURE_PREFIX)]
        assert len({ds.SeriesInstanceUID for ds in heatmaps}) == 1, "one heatmap series"
        assert {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in heatmaps} == view_uids
        assert referenced_images(study_sr) >= {str(ds.SOPInstanceUID) for ds in heatmaps}

        sent = {Path(p).stem for a in results.analyses(mg_job) for p in json.loads(a["outputs"])}
        in_orthanc = {str(ds.SOPInstanceUID) for ds in stored}
        assert sent == in_orthanc, (
            "Orthanc holds exactly what the worker built, no duplicate, nothing missing"
        )
        committed = {c["sop_uid"] for c in results.commitments(mg_job) if c["status"] == "committed"}
        assert committed == in_orthanc
        assert not [c for c in results.commitments(mg_job) if c["status"] != "committed"]

        # --- the RIS: the high-risk study's ORU first, acknowledged with AA
        order = [str(message.segment("OBR")(3)) for message in ris.received]
        assert order[0] == "HIGH1", order
        assert sorted(order[1:]) == ["ROUT0", "ROUT1"]
        first = ris.received[0]
        assert str(first.segment("MSH")(9)).startswith("ORU^R01")
        assert str(first.segment("ZDS")(1)(1)(1)) == mg_study_uid
        observations = {str(s(3)(1)(1)): first.unescape(str(s(5))) for s in first.segments("OBX")}
        assert observations["TRIAGE_CATEGORY"] == "high"
        assert float(observations["RISK"]) > HIGH_RISK_THRESHOLD
        assert str(first.segment("OBR")(5)) == settings.notifications.priority_for("high")
        for message in ris.received[1:]:
            routine_observations = {
                str(s(3)(1)(1)): message.unescape(str(s(5))) for s in message.segments("OBX")
            }
            assert routine_observations["TRIAGE_CATEGORY"] != "high"
        ack = ris.acks[0]
        assert str(ack.segment("MSA")(1)) == "AA"
        assert str(ack.segment("MSA")(2)) == str(first.segment("MSH")(10))
        assert [r["status"] for r in results.notifications(mg_job)] == ["notified"]

        # --- the worklist: the page's data and the public CLI
        rows = {row["job_id"]: row for row in OpsData(settings).worklist()}
        assert next(iter(rows)) == mg_job, "highest risk first"
        assert rows[mg_job]["notified"] is True and rows[mg_job]["committed"] is True
        assert rows[mg_job]["state"] == "delivered"
        listing = subprocess.run(
            [sys.executable, "-m", "workers.cli", "worklist", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert listing.returncode == 0, listing.stderr
        cli_rows = {row["job_id"]: row for row in json.loads(listing.stdout)}
        assert cli_rows[mg_job]["notified"] == ["ris"]
        assert cli_rows[mg_job]["committed"] is True
        assert cli_rows[mg_job]["triage_category"] == "high"

        # --- last, the Mammography CAD SR (TID 4000) among the committed outputs above
        cad_srs = by_class.get(MAMMOGRAPHY_CAD_SR, [])
        assert len(cad_srs) == 1, f"one Mammography CAD SR in the study, found {len(cad_srs)}"
        (cad_sr,) = cad_srs
        assert cad_sr.ConceptNameCodeSequence[0].CodeValue == MAMMOGRAPHY_CAD_REPORT
        assert referenced_images(cad_sr) >= view_uids, "an Image Library entry for each evaluated image"
