"""The study's triage is decided through each model's own operating points, and the worklist says why.

A model's raw score is never compared with another model's: a study is flagged by the model whose risk
reached one of *its* operating points, and the worklist (JSON API, page and CLI) names that model and
that operating point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gateway.messages import Priority
from gateway.settings import load_settings
from plugins.host import ModelHost
from plugins.preprocess import read_image_ref
from plugins.types import HIGH_SENSITIVITY, HIGH_SPECIFICITY, OperatingPoint, Prediction
from plugins.weights import checkpoint_metadata, save_checkpoint
from tests.utils import make_instance, write
from workers.results import ResultsReader, ResultsStore
from workers.triage import CATEGORIES, FALLBACK_HIGH, ModelRisk, decide, priority

REPO = Path(__file__).resolve().parent.parent
BUILTIN_MODELS = ["asg_mammonet", "clgb_net", "lem", "hybrid_birads", "us_fusion"]
TOKEN = "triage-token-0123456789"


def points(sensitive: float, specific: float) -> tuple[OperatingPoint, ...]:
    return (
        OperatingPoint(name=HIGH_SENSITIVITY, threshold=sensitive, sensitivity=0.95, specificity=0.5),
        OperatingPoint(name=HIGH_SPECIFICITY, threshold=specific, sensitivity=0.6, specificity=0.9),
    )


def test_each_model_is_read_against_its_own_operating_points() -> None:
    # A reads high raw scores (a balanced-sampling suspicion score), B low ones (a calibrated probability
    # at screening prevalence).  A's larger number is unremarkable for A; B's smaller one is alarming for B.
    a = ModelRisk(model="a", risk=0.6, operating_points=points(0.7, 0.9))
    b = ModelRisk(model="b", risk=0.2, operating_points=points(0.05, 0.15))
    decision = decide([a, b])
    assert a.risk > b.risk
    assert decision.category == "high" and decision.model == "b" and decision.risk == b.risk
    assert decision.operating_point is not None and decision.operating_point.name == HIGH_SPECIFICITY
    assert decision.operating_point.threshold <= b.risk
    assert "b" in decision.explanation and HIGH_SPECIFICITY in decision.explanation

    between = decide([ModelRisk(model="b", risk=0.1, operating_points=points(0.05, 0.15))])
    assert between.category == "intermediate" and between.operating_point is not None
    assert between.operating_point.name == HIGH_SENSITIVITY

    below = decide([a, ModelRisk(model="b", risk=0.01, operating_points=points(0.05, 0.15))])
    assert below.category == "routine" and below.operating_point is None and below.model == "a"
    assert decide([]).model is None and decide([]).category == "routine"


def test_the_urgent_categories_keep_their_queue_priority() -> None:
    decisions = [
        decide([ModelRisk(model="m", risk=r, operating_points=points(0.3, 0.6))]) for r in (0.9, 0.4, 0.1)
    ]
    assert [d.category for d in decisions] == list(CATEGORIES)
    assert [priority(d) for d in decisions] == sorted(priority(d) for d in decisions)
    assert priority(decisions[0]) == Priority.STAT and priority(decisions[-1]) == Priority.ROUTINE


def test_a_model_without_operating_points_falls_back_to_the_site_threshold() -> None:
    high = decide([ModelRisk(model="old", risk=0.75)], fallback_threshold=0.7)
    assert high.category == "high" and high.operating_point is not None
    assert high.operating_point.name == FALLBACK_HIGH and high.operating_point.threshold == 0.7
    assert decide([ModelRisk(model="old", risk=0.4)], fallback_threshold=0.7).category == "intermediate"
    assert decide([ModelRisk(model="old", risk=0.1)], fallback_threshold=0.7).category == "routine"


def _bright_mammogram(seed: int, bright: bool) -> object:
    ds = make_instance(modality="MG", rows=48, cols=32, seed=seed)
    rng = np.random.default_rng(seed)
    low, high = (3600, 4095) if bright else (0, 400)
    ds.PixelData = rng.integers(low, high, (48, 32), dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.BitsStored, ds.HighBit = 12, 11
    return ds


@pytest.fixture
def probe_settings(tmp_path: Path):
    """Settings serving the brightness probe from a checkpoint that stores measured operating points."""
    from tests.triage_plugins.triage_probe import BrightnessNet, _spec

    spec = _spec("triage_probe")
    stored = points(0.3, 0.8)
    checkpoint = tmp_path / "triage_probe.safetensors"
    save_checkpoint(BrightnessNet(), checkpoint, checkpoint_metadata(spec, {}, operating_points=stored))
    settings = load_settings(
        REPO / "configs" / "default.yaml",
        environ={},
        overrides={
            "gateway.data_dir": str(tmp_path / "data"),
            "http.tokens": [TOKEN],
            "broker.url": "embedded",
            "plugins.drop_in_dir": str(REPO / "tests" / "triage_plugins"),
            "plugins.load_entrypoints": False,
            "plugins.disabled": [*BUILTIN_MODELS, "triage_probe_heavy"],
            "plugins.models": {"triage_probe": {"weights": str(checkpoint)}},
            "triage.first_stage_model": "triage_probe",
        },
    )
    return settings, stored


def test_the_worklist_names_the_model_and_operating_point_behind_a_high_flag(
    tmp_path: Path, probe_settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.commands import run_worklist
    from workers.http import create_app
    from workers.pipeline import prediction_summary
    from workers.tasks import results_store, study_triage

    settings, stored = probe_settings
    host = ModelHost(settings, "cpu")
    assert host.load("triage_probe").operating_points == stored
    store = results_store(settings)
    expected = {}
    for index, bright in enumerate((False, True)):
        ds = _bright_mammogram(index, bright)
        ref = read_image_ref(write(ds, tmp_path / "studies" / f"s{index}"))
        (prediction,) = host.run("triage_probe", [ref])
        assert isinstance(prediction, Prediction) and prediction.operating_points == stored
        job_id = f"job-{index}"
        store.record_analysis(
            job_id, "triage_probe", prediction.risk, [prediction_summary(prediction)], [], []
        )
        decision = study_triage(host, store, job_id, settings)
        store.upsert_study(
            study_uid=str(ds.StudyInstanceUID),
            job_id=job_id,
            version=1,
            priority=int(priority(decision)),
            state="analysed",
            risk=decision.risk,
            findings=[prediction_summary(prediction)],
            triage=decision,
        )
        expected[job_id] = (prediction.risk, decision)
    high = next(job for job, (_, d) in expected.items() if d.category == "high")
    routine = next(job for job, (_, d) in expected.items() if d.category == "routine")
    assert expected[high][0] >= stored[1].threshold > expected[routine][0]

    client = TestClient(create_app(settings))
    rows = client.get("/api/worklist", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    rows = rows["worklist"] if isinstance(rows, dict) else rows
    assert [row["job_id"] for row in rows] == [high, routine]  # the flagged study is at the top
    triage = rows[0]["triage"]
    assert triage["category"] == "high" and triage["model"] == "triage_probe"
    assert triage["operating_point"] == HIGH_SPECIFICITY and triage["threshold"] == stored[1].threshold
    assert "triage_probe" in triage["explanation"] and HIGH_SPECIFICITY in triage["explanation"]
    assert rows[1]["triage"]["category"] == "routine" and rows[1]["triage"]["operating_point"] is None

    page = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert f"triage_probe &ge; {HIGH_SPECIFICITY}" in page

    assert run_worklist(argparse.Namespace(json=True), settings) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (
        listed[0]["triage_model"] == "triage_probe"
        and listed[0]["triage_operating_point"] == HIGH_SPECIFICITY
    )
    assert run_worklist(argparse.Namespace(json=False), settings) == 0
    table = capsys.readouterr().out
    assert "triage_probe" in table and HIGH_SPECIFICITY in table


def test_an_older_results_journal_gains_the_triage_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "results.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE worklist (study_uid TEXT PRIMARY KEY, job_id TEXT NOT NULL, version INTEGER NOT NULL,"
        " risk REAL, priority INTEGER NOT NULL, state TEXT NOT NULL, findings TEXT NOT NULL DEFAULT '[]',"
        " demo_weights INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO worklist VALUES ('1.2.3', 'old-job', 1, 0.4, 6, 'delivered', '[]', 0, 0)")
    db.commit()
    db.close()
    store = ResultsStore(path)
    decision = decide([ModelRisk(model="m", risk=0.9, operating_points=points(0.3, 0.6))])
    store.upsert_study(
        study_uid="1.2.4",
        job_id="new-job",
        version=1,
        priority=0,
        state="analysed",
        risk=0.9,
        triage=decision,
    )
    entries = ResultsReader(path).worklist(10)
    assert [e.job_id for e in entries] == ["new-job", "old-job"]
    assert entries[0].triage_model == "m" and entries[0].triage_operating_point == HIGH_SPECIFICITY
    assert entries[1].triage_category is None
