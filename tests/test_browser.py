"""The worklist page in a real headless browser, over studies that went through the real pipeline.

Studies are C-STOREd to the gateway, which completes them and queues them on the embedded
broker; an embedded Celery worker runs the drop-in brightness models (risk = image brightness,
tests/triage_plugins) and writes the SR and heatmap SCs.  The web service runs under uvicorn,
and Debian's chromium (driven by Playwright, never a downloaded browser) checks that the page
lists the studies in risk order, refreshes itself when a new study arrives, and shows the
heatmaps of the study it opens.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pynetdicom import AE, build_context

from gateway.assembly import job_id_for
from gateway.settings import Settings, load_settings
from tests.test_http import TOKEN, configured_app
from tests.utils import get_port, make_instance, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
BUILTIN_MODELS = ["asg_mammonet", "clgb_net", "lem", "hybrid_birads", "us_fusion"]
#: 12-bit pixel ranges, darkest to brightest: the probe models' risk grows with brightness.
LEVELS = {"dark": (0, 400), "mid": (1600, 2000), "bright": (2600, 3000), "brightest": (3600, 4095)}


def settings_for(tmp: Path) -> Settings:
    return load_settings(REPO / "configs" / "default.yaml", environ={}, overrides={
        "gateway.data_dir": str(tmp / "data"), "gateway.host": "127.0.0.1", "gateway.port": get_port(),
        "assembly.quiet_seconds": 0.5, "assembly.tick_seconds": 0.1, "dispatch.kind": "celery",
        "broker.url": "embedded", "http.tokens": [TOKEN], "triage.first_stage_model": "triage_probe",
        "plugins.drop_in_dir": str(REPO / "tests" / "triage_plugins"), "plugins.load_entrypoints": False,
        "plugins.disabled": BUILTIN_MODELS, "plugins.allow_demo_weights": True,
        # The solo worker runs in this process: an address-space cap would also bind the Chromium it
        # starts, whose V8 reserves far more address space than it uses (it dies with SIGTRAP).
        "worker.memory_limit_mb": 0,
    })


def study_of(level: str, seed: int):
    ds = make_instance(modality="MG", rows=48, cols=32, seed=seed)
    low, high = LEVELS[level]
    ds.PixelData = np.random.default_rng(seed).integers(low, high, (48, 32), dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.BitsStored, ds.HighBit = 12, 11
    return ds


def send(settings: Settings, datasets: list) -> None:
    ae = AE(ae_title="MAMMO_ROOM1")
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in contexts:
        ae.requested_contexts.append(build_context(sop_class, [syntax]))
    assoc = ae.associate("127.0.0.1", settings.gateway.port, ae_title=settings.gateway.ae_title)
    assert assoc.is_established
    assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
    assoc.release()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The gateway, an embedded worker and the web service, with three studies analysed."""
    import uvicorn
    from celery.contrib.testing.worker import start_worker

    import workers.pipeline
    from gateway.service import GatewayService
    from workers.dispatch import CeleryDispatcher
    from workers.http import create_app
    from workers.results import ResultsStore

    tmp = tmp_path_factory.mktemp("browser")
    settings = settings_for(tmp)
    app = configured_app(settings)
    workers.pipeline._hosts.clear()  # a host cached by another test would hold other plugins
    gateway = GatewayService(settings, CeleryDispatcher(app))
    gateway.start()
    results = ResultsStore(Path(settings.gateway.data_dir) / "results.sqlite")
    http = uvicorn.Server(uvicorn.Config(create_app(settings, refresh_seconds=0.5), host="127.0.0.1",
                                         port=get_port(), log_config=None, access_log=False))
    server = threading.Thread(target=http.run, name="uvicorn", daemon=True)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, queues=["analysis", "delivery"],
                          shutdown_timeout=20):
            studies = {level: study_of(level, seed) for seed, level in enumerate(("mid", "dark", "bright"))}
            send(settings, list(studies.values()))
            jobs = {level: job_id_for(str(ds.StudyInstanceUID), 1) for level, ds in studies.items()}
            wait_for(lambda: sum(r["state"] == "done" for r in results.worklist()) == 3, timeout=120,
                     interval=0.2)
            server.start()
            wait_for(lambda: http.started, timeout=20)
            yield SimpleNamespace(settings=settings, jobs=jobs, results=results,
                                  base=f"http://127.0.0.1:{http.config.port}")
    finally:
        http.should_exit = True
        if server.is_alive():
            server.join(timeout=10)
        gateway.stop()
        workers.pipeline._hosts.clear()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; .ci/bootstrap --test-peers installs Debian's chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_worklist_page_lists_studies_by_risk_refreshes_and_opens_heatmaps(
        pipeline: SimpleNamespace, browser: object, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    try:
        page.goto(pipeline.base + "/")
        assert "/login" in page.url  # no token yet
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(pipeline.base + "/")

        rows = page.locator("#worklist tbody tr.study")
        shown = rows.evaluate_all("rows => rows.map(r => [r.dataset.jobId, parseFloat(r.dataset.risk)])")
        assert [job for job, _ in shown] == [pipeline.jobs[level] for level in ("bright", "mid", "dark")]
        risks = [risk for _, risk in shown]
        assert risks == sorted(risks, reverse=True) and risks[0] > risks[-1]
        assert "DEMO WEIGHTS" in page.inner_text("#worklist")

        # A brighter study arrives while the page is open: it goes on top without a reload.
        page.evaluate("window.__stillTheSamePage = true")
        brightest = study_of("brightest", 7)
        send(pipeline.settings, [brightest])
        newest = job_id_for(str(brightest.StudyInstanceUID), 1)
        page.wait_for_function(
            "job => document.querySelector('#worklist tbody tr.study').dataset.jobId === job", arg=newest,
            timeout=90_000)
        assert page.evaluate("window.__stillTheSamePage") is True
        assert rows.count() == 4

        # Opening the top study shows its findings and heatmaps, and its timeline from both sides.
        rows.first.click()
        page.wait_for_url(f"**/studies/{newest}")
        page.wait_for_function(
            "() => { const images = [...document.querySelectorAll('img.heatmap')];"
            " return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }",
            timeout=30_000)
        widths = page.eval_on_selector_all("img.heatmap", "images => images.map(i => i.naturalWidth)")
        assert widths and all(w >= 64 for w in widths)
        assert "malignant" in page.inner_text("section.model")
        events = page.eval_on_selector_all("#timeline tbody tr", "rows => rows.map(r => r.dataset.event)")
        assert events[:3] == ["first_instance", "complete", "queued"]
        assert "analysis_start:first" in events and "model_done:triage_probe" in events
        page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
    finally:
        page.close()
