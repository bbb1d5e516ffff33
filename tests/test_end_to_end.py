"""End to end with real peers: DCMTK storescu -> gateway -> Celery worker on Redis -> Orthanc.

A 4-view mammogram and an ultrasound study go in; the SRs and heatmap SCs come back out of
Orthanc's REST API, and the SR's findings match what the worker predicted.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import yaml
from pydicom.uid import ComprehensiveSRStorage as COMPREHENSIVE_SR
from pydicom.uid import MammographyCADSRStorage as MAMMOGRAPHY_CAD_SR

from gateway.settings import load_settings
from plugins import synthetic
from tests.conftest import require_binary
from tests.peers import running_orthanc
from tests.test_triage_order import BUILTIN_MODELS, start_worker, stop
from tests.utils import get_port, wait_for

REPO = Path(__file__).resolve().parent.parent
#: The risk's concept: DCM 111047 only for a calibrated probability of malignancy, else the score meaning's
#: (DCM 111012 "Certainty of Finding" for the demo weights' uncalibrated scores).
SCORE_CONCEPTS = {"111047", "111012"}


def write_site_config(
    tmp_path: Path, port: int, orthanc: Any, broker_url: str, *, allow_demo_weights: bool
) -> Path:
    """A site config for the whole pipeline on loopback: gateway on *port*, Celery on the Redis at
    *broker_url*, ASG-MammoNet (first stage) and US-Fusion only, delivering to *orthanc*."""
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({
        "gateway": {"port": port, "host": "127.0.0.1", "data_dir": str(tmp_path / "data")},
        "assembly": {"quiet_seconds": 2.0, "tick_seconds": 0.2},
        "broker": {"url": broker_url},
        "dispatch": {"kind": "celery"},
        "logging": {"level": "INFO", "json_output": True},
        "plugins": {"allow_demo_weights": allow_demo_weights, "load_entrypoints": False,
                    "disabled": [m for m in BUILTIN_MODELS if m not in ("asg_mammonet", "us_fusion")]},
        "triage": {"first_stage_model": "asg_mammonet"},
        "delivery": {"destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1",
                                       "port": orthanc.dicom_port}]},
    }))
    return config


@pytest.mark.redis
@pytest.mark.peers
@pytest.mark.slow
def test_storescu_to_gateway_to_worker_to_orthanc(tmp_path: Path, redis_url: str) -> None:
    require_binary("storescu")
    port = get_port()
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        config = write_site_config(tmp_path, port, orthanc, redis_url, allow_demo_weights=True)
        log = tmp_path / "processes.log"
        with log.open("ab") as out:
            gateway = subprocess.Popen([sys.executable, "-m", "workers.cli", "gateway", "--config", str(config)],
                                       stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        worker = start_worker(config, "analysis,delivery", log)
        try:
            send_dir = tmp_path / "send"
            send_dir.mkdir()
            mammo = synthetic.make_mg_study(seed=3, label="malignant")
            ultrasound = [synthetic.make_us_image(seed=4, label="benign").dataset,
                          synthetic.make_us_image(seed=5, label="benign", frames=3, instance_number=2,
                                                  study_uid=None).dataset]
            ultrasound[1].StudyInstanceUID = ultrasound[0].StudyInstanceUID
            for ds in [*mammo, *ultrasound]:
                ds.save_as(send_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            env = {**os.environ, "TCP_NODELAY": "1"}
            wait_for(lambda: subprocess.run(["echoscu", "-aec", "PACS_TRIAGE", "127.0.0.1", str(port)],
                                            env=env, capture_output=True).returncode == 0, timeout=60, interval=0.5)
            subprocess.run(["storescu", "-aec", "PACS_TRIAGE", "-aet", "MODALITY", "+sd", "127.0.0.1", str(port),
                            str(send_dir)], check=True, env=env, timeout=120)

            mg_study, us_study = str(mammo[0].StudyInstanceUID), str(ultrasound[0].StudyInstanceUID)

            def outputs_in_orthanc() -> dict[str, list[pydicom.Dataset]] | None:
                found: dict[str, list[pydicom.Dataset]] = {mg_study: [], us_study: []}
                for orthanc_id in orthanc.instances():
                    ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)), stop_before_pixels=True)
                    if ds.Modality in ("SR", "OT") and ds.StudyInstanceUID in found:
                        found[str(ds.StudyInstanceUID)].append(ds)
                srs = {k: [d for d in v if d.SOPClassUID == COMPREHENSIVE_SR] for k, v in found.items()}
                cad = [d for d in found[mg_study] if d.SOPClassUID == MAMMOGRAPHY_CAD_SR]
                # MG: the study SR, the Mammography CAD SR and four heatmaps; US: the study SR and a heatmap
                # per evaluated image (no CAD SR: it is a mammography document).
                ready = len(srs[mg_study]) == 1 and len(cad) == 1 and len(found[mg_study]) == 6 \
                    and len(srs[us_study]) == 1 and len(found[us_study]) >= 2 \
                    and not [d for d in found[us_study] if d.SOPClassUID == MAMMOGRAPHY_CAD_SR]
                return found if ready else None

            found = wait_for(outputs_in_orthanc, timeout=300, interval=1.0)
        finally:
            stop(worker)
            stop(gateway)
        assert isinstance(found, dict)

        settings = load_settings(config, environ={})
        from workers.results import ResultsStore

        results = ResultsStore(Path(settings.gateway.data_dir) / "results.sqlite")
        predicted = {}
        for row in results.worklist():
            for finding in json.loads(row["findings"]):
                predicted[(finding["model"], finding["sop_instance_uid"])] = finding
        for study, model in ((mg_study, "asg_mammonet"), (us_study, "us_fusion")):
            (sr_header,) = [d for d in found[study] if d.SOPClassUID == COMPREHENSIVE_SR]
            sr_id = orthanc.find_instance(str(sr_header.SOPInstanceUID))
            sr = hd.sr.srread(io.BytesIO(orthanc.instance_file(sr_id)))
            text = " ".join(str(leaf.get("TextValue", "")) for leaf in _walk(sr))
            assert "NOT FOR DIAGNOSTIC USE" in text and "DEMO WEIGHTS" in text
            checked = 0
            for group in _walk(sr):
                if group.get("ValueType") != "CONTAINER" or group.ConceptNameCodeSequence[0].CodeValue != "125007":
                    continue  # not a TID 1501 Measurement Group
                sop = _image_of(group)
                if sop is None or any(leaf.get("ValueType") == "SCOORD" for leaf in _walk(group)):
                    continue  # a breast or study conclusion, or a localisation (its own score)
                for leaf in group.get("ContentSequence", []):
                    if leaf.get("ValueType") == "NUM" and \
                            leaf.ConceptNameCodeSequence[0].CodeValue in SCORE_CONCEPTS:
                        value = float(leaf.MeasuredValueSequence[0].NumericValue)
                        assert value == pytest.approx(predicted[(model, sop)]["risk"], abs=1e-4)
                        checked += 1
            assert checked >= (4 if study == mg_study else 1)
        # Every output reached Orthanc once: no duplicates.
        uids = [d.SOPInstanceUID for d in found[mg_study] + found[us_study]]
        assert len(uids) == len(set(uids))


def _walk(item: pydicom.Dataset):
    yield item
    for child in item.get("ContentSequence", []):
        yield from _walk(child)


def _image_of(group: pydicom.Dataset) -> str | None:
    for leaf in _walk(group):
        if leaf.get("ValueType") == "IMAGE" and leaf.ConceptNameCodeSequence[0].CodeValue != "121200":
            return str(leaf.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None
