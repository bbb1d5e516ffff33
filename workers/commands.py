"""The workers' subcommands: ``worker``, ``worklist``, ``deadletters`` and ``synth``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.settings import Settings

if TYPE_CHECKING:
    import sqlite3

    from celery import Celery

    from workers.results import ResultsStore


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    worker = subparsers.add_parser(
        "worker",
        parents=[common],
        help="run a Celery worker (analysis and/or delivery queues)",
        description="Consume studies from the broker, run every accepting model once loaded, build the SR "
        "and heatmap SCs, and deliver them. Run analysis workers on GPU nodes and a delivery "
        "worker anywhere.",
    )
    worker.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: worker.device)")
    worker.add_argument(
        "--queues",
        default="analysis,delivery",
        help="comma-separated queues to consume (default: analysis,delivery)",
    )
    worker.add_argument("--concurrency", type=int, help="worker processes (default: worker.concurrency)")
    worker.set_defaults(func=run_worker)

    worklist = subparsers.add_parser(
        "worklist",
        parents=[common],
        help="studies, most urgent triage first, with the model and operating point behind it",
    )
    worklist.add_argument("--json", action="store_true", help="print JSON instead of a table")
    worklist.set_defaults(func=run_worklist)

    dead = subparsers.add_parser(
        "deadletters", parents=[common], help="list work that failed for good; replay it with --replay ID"
    )
    dead.add_argument("--replay", type=int, metavar="ID", help="re-queue dead letter ID")
    dead.add_argument("--all", action="store_true", help="include letters already replayed")
    dead.set_defaults(func=run_deadletters)

    synth = subparsers.add_parser(
        "synth", parents=[common], help="write synthetic phantom studies as DICOM (for the tour and tests)"
    )
    synth.add_argument("kind", choices=["mg", "us"], help="mammography 4-view study or ultrasound")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--studies", type=int, default=1, help="number of studies (default 1)")
    synth.add_argument("--label", choices=["benign", "malignant", "normal"], default="malignant")
    synth.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"), help="image size")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=run_synth)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from workers.app import configure_app

    if args.device:
        os.environ["PACS_TRIAGE_WORKER_DEVICE"] = args.device
    app = configure_app(settings)
    concurrency = args.concurrency or settings.worker.concurrency
    queues = ",".join(q.strip() for q in args.queues.split(",") if q.strip())
    app.worker_main(
        [
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-P",
            "prefork",
            "-l",
            settings.logging.level,
            "-n",
            f"pacs-triage-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def run_worklist(args: argparse.Namespace, settings: Settings) -> int:
    from workers.tasks import results_store

    store = results_store(settings)
    rows = store.worklist()
    notified = store.notified_endpoints()
    committed = store.committed_jobs()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        **dict(r),
                        "findings": json.loads(r["findings"]),
                        "notified": notified.get(r["job_id"], []),
                        "committed": r["job_id"] in committed,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    if not rows:
        print("no studies yet")
        return 0
    print(
        f"{'risk':>6}  {'triage':<12} {'state':<13} {'prio':>4}  {'updated':<19}  {'reading room':<20}  "
        "job / findings / why"
    )
    for row in rows:
        findings = json.loads(row["findings"])
        summary = ", ".join(sorted({f"{f['model']}:{f['predicted_class']}" for f in findings})) or "-"
        risk = "-" if row["risk"] is None else f"{row['risk']:.3f}"
        demo = " [DEMO WEIGHTS]" if row["demo_weights"] else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["updated_at"]))
        category = row["triage_category"] or "-"
        # Which model at which operating point put the study there (TriageDecision.explanation).
        why = f"  [{row['triage_explanation']}]" if row["triage_explanation"] else ""
        # Whether the RIS acknowledged the triage flag, and whether the PACS committed every output.
        marks = [
            *(["notified"] if notified.get(row["job_id"]) else []),
            *(["committed"] if row["job_id"] in committed else []),
        ]
        reading_room = ",".join(marks) or "-"
        print(
            f"{risk:>6}  {category:<12} {row['state']:<13} {row['priority']:>4}  {when}  {reading_room:<20}  "
            f"{row['job_id']}  {summary}{demo}{why}"
        )
    return 0


def run_deadletters(args: argparse.Namespace, settings: Settings) -> int:
    from workers.app import configure_app
    from workers.tasks import results_store

    store = results_store(settings)
    if args.replay is not None:
        letter = replay_dead_letter(store, configure_app(settings), args.replay)
        if letter is None:
            print(f"error: no dead letter {args.replay}", file=sys.stderr)
            return 2
        print(f"re-queued dead letter {args.replay} ({letter['task']} of {letter['job_id']})")
        return 0
    letters = store.dead_letters(include_replayed=args.all)
    if not letters:
        print("no dead letters")
        return 0
    for letter in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter["at"]))
        replayed = " (replayed)" if letter["replayed_at"] else ""
        print(
            f"{letter['id']:>5}  {when}  {letter['task']:<8} {letter['job_id']}  {letter['error']}{replayed}"
        )
    print("replay one with: pacs-triage deadletters --replay ID")
    return 0


def replay_dead_letter(store: ResultsStore, app: Celery, letter_id: int) -> sqlite3.Row | None:
    """Re-queue dead letter *letter_id* at the highest priority and mark it replayed.

    Shared by ``deadletters --replay`` and the web service's replay action.

    :param store: The workers' results journal.
    :param app: A configured Celery app to publish with.
    :returns: The letter, or ``None`` when there is no such letter.
    """
    letter = store.dead_letter_by_id(letter_id)
    if letter is None:
        return None
    kwargs = json.loads(letter["kwargs"])
    queue = "delivery" if letter["task"] in ("deliver", "notify") else "analysis"
    store.reset_attempts(f"analyse:{letter['job_id']}:{kwargs.get('stage', 'first')}")
    app.send_task(f"workers.tasks.{letter['task']}", kwargs=kwargs, queue=queue, priority=0)
    store.mark_replayed(letter_id)
    store.event(letter["job_id"], "replayed", f"letter {letter_id}")
    return letter


def run_synth(args: argparse.Namespace, settings: Settings) -> int:
    from plugins import synthetic

    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(args.studies):
        seed = args.seed + index
        kwargs: dict[str, Any] = {"size": tuple(args.size)} if args.size else {}
        if args.kind == "mg":
            datasets = synthetic.make_mg_study(seed=seed, label=args.label, **kwargs)
        else:
            datasets = [synthetic.make_us_image(seed=seed, label=args.label, **kwargs).dataset]
        for ds in datasets:
            ds.save_as(args.out / f"{args.kind}-{seed:04d}-{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            written += 1
    print(f"wrote {written} DICOM files to {args.out}")
    return 0
