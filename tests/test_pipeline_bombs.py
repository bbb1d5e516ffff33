"""Hostile images: a declared 60000 x 60000 RLE image and a 5000-frame object.

The pixel budget refuses both from the header, before any decoding, and the study ends in a
documented final state (skipped when nothing else is in it, done for its other images).  With the
budget lifted, the pool process's address-space limit turns the allocation into one image's
out-of-memory failure; the process carries on with the next image.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.pipeline_cases import (  # noqa: F401
    REPO,
    Harness,
    _harness,
    bright_mammogram,
    frame_bomb,
    harness,
    harness_settings,
    new_study_uid,
    rle_pixel_bomb,
)


def _skipped(harness: Harness, job_id: str) -> dict[str, str]:
    """SOP UID -> reason of every image a model of the job left out (from the model_done events)."""
    skipped: dict[str, str] = {}
    for event in harness.store.timeline(job_id):
        if event["event"].startswith("model_done:"):
            skipped.update({s["sop_instance_uid"]: s["reason"] for s in json.loads(event["detail"])["skipped"]})
    return skipped


@pytest.mark.parametrize("bomb", [rle_pixel_bomb, frame_bomb], ids=["60000x60000-rle", "5000-frames"])
def test_a_bomb_alone_is_skipped_by_the_budget_and_the_next_study_is_analysed(harness: Harness, bomb) -> None:
    job = harness.job([bomb(new_study_uid())])
    row = harness.run(job)
    assert row["state"] == "skipped"
    [reasons] = json.loads(harness.timeline(job)["skipped"]).values()
    assert set(reasons) == {"all"} and "per-image budget" in reasons["all"]
    assert harness.store.dead_letters() == []
    assert harness.run(harness.job([bright_mammogram(new_study_uid())]))["state"] == "done"


def test_a_bomb_beside_a_real_view_leaves_the_view_analysed(harness: Harness) -> None:
    study_uid = new_study_uid()
    view, bomb = bright_mammogram(study_uid), rle_pixel_bomb(study_uid)
    job = harness.job([view, bomb])
    row = harness.run(job)
    assert row["state"] == "done"
    assert {f["sop_instance_uid"] for f in json.loads(row["findings"])} == {str(view.SOPInstanceUID)}
    assert "per-image budget" in _skipped(harness, job.job_id)[str(bomb.SOPInstanceUID)]


def test_the_study_budget_refuses_the_images_past_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each 48 x 32 16-bit view declares 3072 bytes: two fit in 7000, the third does not.
    settings = harness_settings(tmp_path, worker={"max_study_pixel_bytes": 7000})
    harness = next(_harness(tmp_path, monkeypatch, settings))
    study_uid = new_study_uid()
    views = [bright_mammogram(study_uid, seed=i, view=v) for i, v in enumerate(["CC", "MLO", "XCC"])]
    job = harness.job(views)
    row = harness.run(job)
    assert row["state"] == "done"
    assert {f["sop_instance_uid"] for f in json.loads(row["findings"])} == {str(v.SOPInstanceUID) for v in views[:2]}
    assert "per-study budget" in _skipped(harness, job.job_id)[str(views[2].SOPInstanceUID)]


_OUT_OF_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from gateway.messages import StudyJob
    from gateway.settings import load_settings
    from workers import pipeline
    from workers.app import apply_memory_limit

    settings = load_settings(sys.argv[2], environ={})
    job = StudyJob.from_json_dict(json.loads(Path(sys.argv[3]).read_text()))
    limit = apply_memory_limit(settings)
    host = pipeline.model_host(settings, "cpu")
    sources = pipeline.read_sources(job)
    [run] = pipeline.analyse_study(host, ["triage_probe"], sources, settings, Path(sys.argv[4]))
    print(json.dumps({"limit": limit, "soft": resource.getrlimit(resource.RLIMIT_AS)[0],
                      "predicted": [p.image.sop_instance_uid for p in run.predictions],
                      "failures": {f.image.sop_instance_uid: f.error for f in run.failures}}))
""")


def _address_space_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_with_the_budget_lifted_the_memory_limit_makes_a_pixel_bomb_one_image_s_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A limit above what this test process (torch loaded) already maps, far below the bomb's 7.2 GB.
    limit_mb = (_address_space_bytes() >> 20) + 1536
    settings = harness_settings(tmp_path, worker={"max_image_pixel_bytes": 1 << 40, "max_study_pixel_bytes": 1 << 41,
                                                  "memory_limit_mb": limit_mb})
    harness = next(_harness(tmp_path, monkeypatch, settings))
    study_uid = new_study_uid()
    bomb, view = rle_pixel_bomb(study_uid), bright_mammogram(study_uid)
    job = harness.job([bomb, view])
    (tmp_path / "job.json").write_text(json.dumps(job.to_json_dict()))
    done = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_SCRIPT, str(REPO), settings.source,
                           str(tmp_path / "job.json"), str(tmp_path / "outputs")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["limit"] == result["soft"] == limit_mb << 20
    assert "out of memory" in result["failures"][str(bomb.SOPInstanceUID)]
    assert result["predicted"] == [str(view.SOPInstanceUID)]  # the process went on to the next image


def test_each_pool_process_gets_the_configured_address_space_limit(tmp_path: Path) -> None:
    settings = harness_settings(tmp_path, worker={"memory_limit_mb": 12345})
    script = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from celery.signals import worker_process_init
        from gateway.settings import load_settings
        from workers.app import configure_app
        configure_app(load_settings(sys.argv[2], environ={}))
        worker_process_init.send(sender=None)
        print(resource.getrlimit(resource.RLIMIT_AS)[0])
    """)
    done = subprocess.run([sys.executable, "-c", script, str(REPO), settings.source], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == 12345 << 20
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != 12345 << 20  # this test process is left alone


def test_pool_processes_inherit_highdicom_s_tables_loaded_before_the_fork() -> None:
    """The worker's main process loads highdicom's tables of the standard (worker_init) before it forks its
    pool: a pool process then builds outputs without parsing them again on its first study."""
    script = textwrap.dedent("""
        import json, os, sys
        sys.path.insert(0, sys.argv[1])
        import highdicom as hd, pydicom
        from celery.signals import worker_init
        import workers.app  # noqa: F401 - connects the worker's signal handlers
        worker_init.send(sender=None)
        pid = os.fork()
        if pid == 0:
            def parsed_again(*args, **kwargs):
                raise AssertionError("a table of the standard was parsed again")
            json.loads = parsed_again
            code = 0
            try:
                for sop_class in (pydicom.uid.DigitalMammographyXRayImageStorageForPresentation,
                                  pydicom.uid.SecondaryCaptureImageStorage):
                    image = pydicom.Dataset()
                    image.SOPClassUID, image.Manufacturer = sop_class, "modality"
                    hd.ContributingEquipment.for_image_acquisition(image)
            except AssertionError:
                code = 3
            os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0"
