"""Latency from the last instance received to the SR stored in the PACS, split by stage.

Runs the real processes: Orthanc as the PACS, ``pacs-triage gateway`` and ``--workers`` separate
``pacs-triage worker`` processes on a private ``redis-server`` it starts on a free loopback port
(never a Redis it did not start), DCMTK ``storescu`` as the modality.  Sends one 4-view
synthetic mammogram alone, then a burst of N studies, and reads every timestamp back from the
gateway journal and the workers' journal:

    completion wait = study complete   - last instance received
    queue           = analysis start   - study complete          (dispatch + broker + worker pick-up)
    inference       = the model's own time (host.run)
    outputs         = SR + SC building
    delivery        = SR stored in the PACS - analysis end

Usage: .venv/bin/python benchmarks/pipeline/bench_latency.py [--burst 50] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from plugins import synthetic  # noqa: E402
from tests.peers import Orthanc, RedisServer  # noqa: E402
from tests.utils import get_port  # noqa: E402

MODELS = ["asg_mammonet", "clgb_net", "lem", "hybrid_birads", "us_fusion"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True, env=env
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def send(studies: list[list], port: int, workdir: Path) -> None:
    folder = workdir / f"send-{time.monotonic_ns()}"
    folder.mkdir()
    for study in studies:
        for ds in study:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    subprocess.run(
        ["storescu", "-aec", "PACS_TRIAGE", "+sd", "127.0.0.1", str(port), str(folder)],
        check=True,
        env=env,
        timeout=600,
    )


def measure(data_dir: Path, study_uids: list[str], timeout: float) -> list[dict[str, float]]:
    """Wait until every study was delivered and return its stage durations."""
    journal = data_dir / "journal.sqlite"
    results = data_dir / "results.sqlite"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if results.exists():
            done = (
                sqlite3.connect(results)
                .execute(
                    # The worklist says "delivered" a moment before the timeline's "delivered" event is written.
                    "SELECT COUNT(*) FROM worklist w WHERE w.state = 'delivered' AND EXISTS (SELECT 1 FROM "
                    "timeline t WHERE t.job_id = w.job_id AND t.event = 'delivered') AND w.study_uid IN ({})".format(
                        ",".join("?" * len(study_uids))
                    ),
                    study_uids,
                )
                .fetchone()[0]
            )
            if done == len(study_uids):
                break
        time.sleep(0.5)
    else:
        raise TimeoutError("not every study was delivered in time")
    gw, res = sqlite3.connect(journal), sqlite3.connect(results)
    rows = []
    for uid in study_uids:
        last, completed = gw.execute(
            "SELECT MAX(i.received_at), s.completed_at FROM instances i JOIN studies s ON s.study_uid = i.study_uid"
            " WHERE i.study_uid = ?",
            (uid,),
        ).fetchone()
        (job_id,) = res.execute("SELECT job_id FROM worklist WHERE study_uid = ?", (uid,)).fetchone()
        events = {}
        model = {}
        for at, event, detail in res.execute(
            "SELECT at, event, detail FROM timeline WHERE job_id = ? ORDER BY at", (job_id,)
        ):
            events.setdefault(event, at)
            if event.startswith("model_done"):
                model = json.loads(detail)
        rows.append(
            {
                "completion_wait": completed - last,
                "queue": events["analysis_start:first"] - completed,
                "inference": model["inference_s"],
                "outputs": model["outputs_s"],
                "delivery": events["delivered"] - events["analysis_end:first"],
                "total": events["delivered"] - last,
            }
        )
    return rows


def summarise(name: str, rows: list[dict[str, float]]) -> dict[str, object]:
    totals = [r["total"] for r in rows]
    return {
        "scenario": name,
        "studies": len(rows),
        "p50_s": percentile(totals, 50),
        "p95_s": percentile(totals, 95),
        "p99_s": percentile(totals, 99),
        **{
            f"mean_{k}_s": statistics.mean(r[k] for r in rows)
            for k in ("completion_wait", "queue", "inference", "outputs", "delivery")
        },
        "mean_inference_s": statistics.mean(r["inference"] for r in rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="separate `pacs-triage worker` processes")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of each worker (0: cores / workers, at least 1)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quiet-seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 416), help="rows cols of each MG view")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pacs-triage-bench-"))
    # Its own broker on a free port: a shared Redis (6379) may hold other jobs' queues.
    redis_server = RedisServer(workdir / "redis", persistent=False)
    try:
        orthanc = Orthanc(workdir / "orthanc")
    except BaseException:
        redis_server.stop()
        raise
    port = get_port()
    config = workdir / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"port": port, "host": "127.0.0.1", "data_dir": str(workdir / "data")},
                "assembly": {"quiet_seconds": args.quiet_seconds, "tick_seconds": 0.2},
                "broker": {"url": redis_server.url},
                "dispatch": {"kind": "celery"},
                "logging": {"level": "WARNING", "json_output": True},
                "plugins": {
                    "allow_demo_weights": True,
                    "load_entrypoints": False,
                    "disabled": [m for m in MODELS if m != "asg_mammonet"],
                },
                "triage": {"first_stage_model": "asg_mammonet"},
                "delivery": {
                    "destinations": [
                        {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
                    ]
                },
            }
        )
    )
    log = workdir / "processes.log"
    cli = [sys.executable, "-m", "workers.cli"]
    gateway = start([*cli, "gateway", "--config", str(config)], log)
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // args.workers)
    worker_env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    workers = [
        start([*cli, "worker", "--config", str(config), "--concurrency", "1"], log, worker_env)
        for _ in range(args.workers)
    ]
    summaries = []
    try:
        time.sleep(8)
        size = tuple(args.size)
        # One study per worker loads the model in each (most likely: the broker hands them out in turn); not measured.
        warm = [synthetic.make_mg_study(seed=990 + i, size=size) for i in range(args.workers)]
        send(warm, port, workdir)
        measure(workdir / "data", [str(s[0].StudyInstanceUID) for s in warm], 600)
        alone = [synthetic.make_mg_study(seed=1, size=size)]
        send(alone, port, workdir)
        summaries.append(
            summarise("1 study alone", measure(workdir / "data", [str(alone[0][0].StudyInstanceUID)], 600))
        )
        burst = [
            synthetic.make_mg_study(seed=100 + i, size=size, label="benign" if i % 2 else "malignant")
            for i in range(args.burst)
        ]
        send(burst, port, workdir)
        summaries.append(
            summarise(
                f"{args.burst} studies in a burst",
                measure(workdir / "data", [str(s[0].StudyInstanceUID) for s in burst], 1800),
            )
        )
    finally:
        for worker in workers:
            stop(worker)
        stop(gateway)
        orthanc.stop()
        redis_server.stop()
    report = {
        "workers": args.workers,
        "torch_threads_per_worker": threads,
        "quiet_seconds": args.quiet_seconds,
        "size": list(args.size),
        "load_average": os.getloadavg(),
        "scenarios": summaries,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
