"""Soak: a burst of mixed studies over parallel associations while workers analyse them; throughput, latency
from the last instance received to the results in the PACS, and the memory of every process over time.

Runs the real processes through the fault suite's harness (``tests/faults_harness.py``): a private Redis,
Orthanc as the PACS, ``pacs-triage gateway``, ``pacs-triage worker`` (ASG-MammoNet and the ultrasound
fusion model on demo weights, on the CPU) and DCMTK ``storescu`` as the modalities, one process per
association, each sending whole studies.  At the end it checks the suite's invariant (every acknowledged
instance analysed, every output in Orthanc exactly once, or visibly dead-lettered) and that no log holds
a patient name, ID or birth date.

Usage (the full run of benchmarks/soak/README.md; about 10 minutes on 2 shared cores):

    .venv/bin/python benchmarks/soak/soak.py --out benchmarks/soak/results.json

A quick look: ``--mg-studies 4 --us-studies 2 --mg-size 512 416``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from plugins import synthetic  # noqa: E402
from tests.faults_harness import (  # noqa: E402
    MemorySampler,
    Pipeline,
    mixed_studies,
    percentile,
    send_studies,
    study_timings,
)

MODELS = ("asg_mammonet", "us_fusion")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    config = {
        "assembly": {"quiet_seconds": args.quiet_seconds, "tick_seconds": 0.2},
        # The production limits: a full-field study on a loaded CPU takes tens of seconds.
        "worker": {"soft_time_limit_seconds": 1200, "time_limit_seconds": 1500, "max_redeliveries": 3},
        "delivery": {"max_retries": 8, "backoff_base_seconds": 2, "backoff_max_seconds": 60},
        "logging": {"level": "INFO", "json_output": True},
    }
    print(
        f"making {args.mg_studies} MG studies at {args.mg_size[0]}x{args.mg_size[1]} and "
        f"{args.us_studies} US "
        f"studies ({args.us_frames} frames at {args.us_size[0]}x{args.us_size[1]}) ...",
        flush=True,
    )
    studies = mixed_studies(
        args.mg_studies, args.us_studies, tuple(args.mg_size), tuple(args.us_size), args.us_frames
    )
    warm_up = mixed_studies(1, 1, (512, 416), tuple(args.us_size), 2, seed=9000)
    with Pipeline(workdir, models=MODELS, config=config) as pipeline:
        sampler = MemorySampler(pipeline, interval=args.sample_seconds)
        pipeline.start_gateway()
        for index in range(args.workers):
            pipeline.start_worker(f"worker-{index}")
        sampler.start()
        # Load both models before measuring: the first study of each kind pays for it.
        pipeline.send([ds for study in warm_up for ds in study])
        pipeline.wait_settled([str(s[0].StudyInstanceUID) for s in warm_up], timeout=600)
        after_warm_up = sampler.sample()
        print(f"warm: {json.dumps(after_warm_up)}", flush=True)

        sent_at = time.time()
        send_seconds = send_studies(pipeline, studies, args.associations)
        uids = [str(s[0].StudyInstanceUID) for s in studies]
        print(
            f"sent {sum(map(len, studies))} instances in {send_seconds:.1f} s; waiting for the results ...",
            flush=True,
        )
        pipeline.wait_settled(uids, timeout=args.timeout)
        time.sleep(2 * args.sample_seconds)
        at_end = sampler.sample()
        sampler.stop()
        pipeline.check_invariant(uids)
        dead = pipeline.dead_letters()
        timings = study_timings(pipeline, uids)
        mg_uids = {str(s[0].StudyInstanceUID) for s in studies if s[0].Modality == "MG"}
    latencies = [t["latency"] for t in timings]
    by_kind = {
        kind: [
            t["latency"] for uid, t in zip(uids, timings, strict=True) if (uid in mg_uids) == (kind == "MG")
        ]
        for kind in ("MG", "US")
    }
    span = max(t["delivered"] for t in timings) - min(t["first_received"] for t in timings)
    instances = sum(map(len, studies))
    result: dict[str, object] = {
        "studies": len(studies),
        "mg_studies": args.mg_studies,
        "us_studies": args.us_studies,
        "instances": instances,
        "associations": args.associations,
        "workers": args.workers,
        "mg_size": list(args.mg_size),
        "us_size": list(args.us_size),
        "us_frames": args.us_frames,
        "bytes_sent": sum(len(ds.PixelData) for s in studies for ds in s),
        "send_seconds": round(send_seconds, 1),
        "span_seconds": round(span, 1),
        "throughput_studies_per_min": round(60 * len(studies) / span, 2),
        "throughput_instances_per_s": round(instances / span, 3),
        "latency_s": {
            "p50": round(percentile(latencies, 50), 1),
            "p95": round(percentile(latencies, 95), 1),
            "p99": round(percentile(latencies, 99), 1),
            "min": round(min(latencies), 1),
            "max": round(max(latencies), 1),
            "mean": round(statistics.mean(latencies), 1),
        },
        "latency_by_modality_p50_s": {k: round(percentile(v, 50), 1) for k, v in by_kind.items() if v},
        "peak_memory_mib": {name: round(kib / 1024, 1) for name, kib in sorted(sampler.peak_kib.items())},
        "rss_after_warm_up_mib": {k: round(v / 1024, 1) for k, v in after_warm_up.items()},
        "rss_at_end_mib": {k: round(v / 1024, 1) for k, v in at_end.items()},
        "dead_letters": len(dead),
        "memory_samples": [
            {"t": t, **{k: round(v / 1024, 1) for k, v in sample.items()}} for t, sample in sampler.samples
        ],
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(sent_at)),
        "cpus": os.cpu_count(),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mg-studies", type=int, default=35, help="4-view mammograms (default 35)")
    parser.add_argument("--us-studies", type=int, default=15, help="ultrasound studies (default 15)")
    parser.add_argument(
        "--mg-size",
        type=int,
        nargs=2,
        default=list(synthetic.MG_FULL_SIZE),
        metavar=("ROWS", "COLS"),
        help="mammogram size (default full field, 3328 2560)",
    )
    parser.add_argument("--us-size", type=int, nargs=2, default=[480, 640], metavar=("ROWS", "COLS"))
    parser.add_argument("--us-frames", type=int, default=16, help="frames of each ultrasound cine loop")
    parser.add_argument("--associations", type=int, default=4, help="parallel storescu processes (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="worker nodes (default 1, concurrency 1 each)")
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=5.0,
        help="assembly quiet time; ultrasound studies complete by it (default 5)",
    )
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="memory sampling interval")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for every result")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, journals)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pacs-triage-soak-"))
    try:
        result = run(args, workdir)
    finally:
        if args.keep:
            print(f"working directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {k: v for k, v in result.items() if k != "memory_samples"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
