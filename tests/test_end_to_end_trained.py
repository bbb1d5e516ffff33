"""End to end with checkpoints trained here: train --deploy, then storescu -> gateway -> worker -> Orthanc.

Issue 6's last requirement: the plugin loads the exported checkpoint and predicts with it in the pipeline.
ASG-MammoNet and the ultrasound fusion model are trained briefly on synthetic phantoms through the
``train`` CLI, which deploys each checkpoint into the site config; demo weights are switched off, so a
model without its deployed checkpoint cannot run at all.  A mammogram and an ultrasound study then go
through the real gateway, Celery worker and Orthanc.  Their SRs and heatmaps must name the deployed weights,
nothing (SR, heatmaps, worklist) may be labelled demo, and the SRs and the worklist must carry the
probabilities that a fresh host computes from those checkpoints.
How well the models learn is tests/test_training.py's business, not this test's.
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
import pydicom
import pytest
import torch
from pydicom.uid import ComprehensiveSRStorage as COMPREHENSIVE_SR

from gateway.settings import load_settings
from plugins import synthetic
from plugins.host import ModelHost
from plugins.preprocess import read_image_ref
from plugins.types import Prediction
from plugins.weights import file_sha256, load_checkpoint
from tests.conftest import require_binary
from tests.peers import running_orthanc
from tests.test_end_to_end import SCORE_CONCEPTS, _image_of, _walk, write_site_config
from tests.test_triage_order import start_worker, stop
from tests.utils import get_port, wait_for
from workers.results import ResultsStore

pytestmark = [pytest.mark.redis, pytest.mark.peers, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TRAINED = {"asg_mammonet": "mg", "us_fusion": "us"}
MEASUREMENT_GROUP = "125007"
ALGORITHM_PARAMETERS = "111002"


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Two cores shared with other jobs: every torch here (this process, trainer, worker) runs on one thread,
    # which also keeps the worker's and the reference host's arithmetic alike.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(variable, "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_and_deploy(arch: str, manifest: Path, out: Path, config: Path, *extra: str) -> Path:
    command = [
        sys.executable, "-m", "workers.cli", "train", "--config", str(config), "--arch", arch,
        "--dataset", "csv", "--data", str(manifest), "--out", str(out), "--input-size", "64",
        "--epochs", "1", "--batch-size", "8", "--split", "0.6,0.2,0.2", "--seed", "1",
        "--device", "cpu", "--workers", "0", "--no-progress", "--bootstrap", "0", *extra,
        "--deploy", str(config),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, f"train {arch} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "deployed" in done.stdout, done.stdout[-3000:]
    return out / f"{arch}.safetensors"


def _images_of(expected: dict[tuple[str, str], Prediction], arch: str) -> set[str]:
    return {uid for model, uid in expected if model == arch}


def _tail(path: Path, limit: int = 6000) -> str:
    return path.read_text(errors="replace")[-limit:] if path.exists() else ""


def test_trained_checkpoints_serve_in_the_pipeline(tmp_path: Path, one_thread: None, redis_url: str) -> None:
    require_binary("storescu")
    port = get_port()
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        config = write_site_config(tmp_path, port, orthanc, redis_url, allow_demo_weights=False)

        checkpoints: dict[str, Path] = {}
        for arch, kind in TRAINED.items():
            manifest = synthetic.write_dataset_dir(tmp_path / f"set-{kind}", kind, 40, seed=21,
                                                   classes=("benign", "malignant"))
            # a_only: the fusion model's lighter branch, so its training fits the test's budget; its
            # recipe's warm-up needs more than the one epoch trained here.
            extra = ("--option", "fusion=a_only", "--set", "warmup_epochs=0") if arch == "us_fusion" else ()
            checkpoints[arch] = _train_and_deploy(arch, manifest, tmp_path / f"run-{arch}", config, *extra)

        settings = load_settings(config, environ={})
        sha256: dict[str, str] = {}
        for arch, checkpoint in checkpoints.items():
            assert settings.plugin_config(arch).weights == checkpoint.resolve()
            _, metadata = load_checkpoint(checkpoint)
            assert not metadata.demo
            sha256[arch] = file_sha256(checkpoint)
            assert metadata.sha256 == sha256[arch]
        assert settings.plugins.allow_demo_weights is False

        send_dir = tmp_path / "send"
        send_dir.mkdir()
        mammo = synthetic.make_mg_study(seed=3, label="malignant")
        ultrasound = synthetic.make_us_image(seed=4, label="malignant").dataset
        sent: dict[str, Path] = {}
        for ds in [*mammo, ultrasound]:
            sent[str(ds.SOPInstanceUID)] = send_dir / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(sent[str(ds.SOPInstanceUID)], enforce_file_format=True)
        mg_study, us_study = str(mammo[0].StudyInstanceUID), str(ultrasound.StudyInstanceUID)

        log = tmp_path / "processes.log"
        with log.open("ab") as out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "gateway", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            )
        worker = None
        try:
            worker = start_worker(config, "analysis,delivery", log)
            env = {**os.environ, "TCP_NODELAY": "1"}
            echo = ["echoscu", "-aec", "PACS_TRIAGE", "127.0.0.1", str(port)]
            wait_for(lambda: subprocess.run(echo, env=env, capture_output=True).returncode == 0,
                     timeout=60, interval=0.5)
            subprocess.run(["storescu", "-aec", "PACS_TRIAGE", "-aet", "MODALITY", "+sd", "127.0.0.1",
                            str(port), str(send_dir)], check=True, env=env, timeout=120)

            def outputs_in_orthanc() -> dict[str, list[pydicom.Dataset]] | None:
                found: dict[str, list[pydicom.Dataset]] = {mg_study: [], us_study: []}
                for orthanc_id in orthanc.instances():
                    blob = io.BytesIO(orthanc.instance_file(orthanc_id))
                    ds = pydicom.dcmread(blob, stop_before_pixels=True)
                    if ds.Modality in ("SR", "OT") and ds.StudyInstanceUID in found:
                        found[str(ds.StudyInstanceUID)].append(ds)
                counts = {study: sorted(d.Modality for d in items) for study, items in found.items()}
                # MG: the study SR, the Mammography CAD SR and a heatmap per view; US: one SR and the image's
                # heatmap.
                ready = counts[mg_study] == ["OT"] * 4 + ["SR", "SR"] and counts[us_study] == ["OT", "SR"]
                return found if ready else None

            def delivered() -> bool:
                # Orthanc holds the outputs a moment before the worker journals their delivery.
                rows = ResultsStore(tmp_path / "data" / "results.sqlite").worklist()
                return {row["study_uid"]: row["state"] for row in rows} == \
                    {mg_study: "delivered", us_study: "delivered"}

            try:
                found = wait_for(outputs_in_orthanc, timeout=300, interval=1.0)
                wait_for(delivered, timeout=60, interval=0.5)
            except AssertionError as error:
                raise AssertionError(f"{error}; gateway and worker log:\n{_tail(log)}") from None
        finally:
            if worker is not None:
                stop(worker)
            stop(gateway)
        assert isinstance(found, dict)

        # What the deployed checkpoints give on the very files that were sent, computed here, not remembered.
        host = ModelHost(settings, "cpu")
        expected: dict[tuple[str, str], Prediction] = {}
        for arch in TRAINED:
            loaded = host.load(arch)
            assert loaded.weights_path == checkpoints[arch].resolve() and not loaded.demo_weights
            for uid, path in sent.items():
                for result in host.run(arch, [read_image_ref(path)]):
                    if isinstance(result, Prediction):
                        assert result.weights_sha256 == sha256[arch] and not result.demo_weights
                        expected[(arch, uid)] = result
        assert _images_of(expected, "asg_mammonet") == {str(d.SOPInstanceUID) for d in mammo}
        assert _images_of(expected, "us_fusion") == {str(ultrasound.SOPInstanceUID)}

        for study, arch in ((mg_study, "asg_mammonet"), (us_study, "us_fusion")):
            (sr_header,) = [d for d in found[study] if d.SOPClassUID == COMPREHENSIVE_SR]
            sr_id = orthanc.find_instance(str(sr_header.SOPInstanceUID))
            sr = hd.sr.srread(io.BytesIO(orthanc.instance_file(sr_id)))
            texts = [str(item.get("TextValue", "")) for item in _walk(sr)]
            assert any("NOT FOR DIAGNOSTIC USE" in text for text in texts)
            # Only the demo notice says "DEMO WEIGHTS"; the parameters' "demo_weights=False" is checked below.
            assert not any("DEMO WEIGHTS" in text.upper() for text in texts), texts
            assert "demo_weights=True" not in texts
            checked = set()
            for group in _walk(sr):
                if group.get("ValueType") != "CONTAINER" or group.ConceptNameCodeSequence[0].CodeValue != \
                        MEASUREMENT_GROUP:
                    continue
                # TID 4019 in every group names the weights that produced it.
                parameters = {str(item.TextValue) for item in _walk(group) if item.get("ValueType") == "TEXT"
                              and item.ConceptNameCodeSequence[0].CodeValue == ALGORITHM_PARAMETERS}
                assert f"weights_sha256={sha256[arch]}" in parameters, parameters
                assert "demo_weights=False" in parameters, parameters
                if arch == "us_fusion":  # trained with one branch only: the report must say which build ran
                    assert any(p.startswith("options=") and "a_only" in p for p in parameters), parameters
                sop = _image_of(group)
                if sop is None or any(leaf.get("ValueType") == "SCOORD" for leaf in _walk(group)):
                    continue  # a breast or study conclusion, or a localisation (its own score)
                for leaf in group.get("ContentSequence", []):
                    if leaf.get("ValueType") == "NUM" and \
                            leaf.ConceptNameCodeSequence[0].CodeValue in SCORE_CONCEPTS:
                        value = float(leaf.MeasuredValueSequence[0].NumericValue)
                        assert value == pytest.approx(expected[(arch, sop)].risk, abs=1e-4), (arch, sop)
                        checked.add(sop)
            assert checked == _images_of(expected, arch)

            # The reported version names the weights (plugin version / weights version - sha256 prefix),
            # in the SR's algorithm identification and in every heatmap's derivation.
            version = expected[(arch, next(iter(checked)))].model_version
            assert sha256[arch][:8] in version
            assert any(version in text for text in texts), texts
            for sc in (d for d in found[study] if d.Modality == "OT"):
                assert sc.ImageComments == "NOT FOR DIAGNOSTIC USE"
                assert version in str(sc.DerivationDescription)
                assert "DEMO" not in str(sc.DerivationDescription).upper()
                assert "DEMO" not in str(sc.SeriesDescription).upper()

        results = ResultsStore(Path(settings.gateway.data_dir) / "results.sqlite")
        rows = {row["study_uid"]: row for row in results.worklist()}
        assert set(rows) == {mg_study, us_study}
        for study, arch in ((mg_study, "asg_mammonet"), (us_study, "us_fusion")):
            row = rows[study]
            assert row["state"] == "delivered" and row["demo_weights"] == 0
            findings = json.loads(row["findings"])
            assert {f["model"] for f in findings} == {arch}
            assert {f["sop_instance_uid"] for f in findings} == _images_of(expected, arch)
            for finding in findings:
                assert finding["demo_weights"] is False
                assert finding["model_version"] == expected[(arch, finding["sop_instance_uid"])].model_version
                assert finding["risk"] == pytest.approx(expected[(arch, finding["sop_instance_uid"])].risk,
                                                        abs=1e-4)
        uids = [d.SOPInstanceUID for d in found[mg_study] + found[us_study]]
        assert len(uids) == len(set(uids))
