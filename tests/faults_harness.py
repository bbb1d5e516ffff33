"""The fault suite's harness: real processes started per test, and the invariant every scenario ends with.

The processes are the gateway, Celery workers, a private Redis, Orthanc and DCMTK storescu.

**The invariant.** Every instance the gateway acknowledged (every row of its journal: a row is committed
before the C-STORE response says 0x0000) is analysed in its study's latest version, and that version's
outputs, with those of every earlier version, are in the PACS exactly once: Orthanc holds exactly the SOP
Instance UIDs the workers' journal lists as outputs, no more and no fewer.  The one allowed exception is
work that is visibly dead-lettered (``pacs-triage deadletters`` lists it).  :meth:`Pipeline.check_invariant`
asserts it.

Every process writes its own log under ``<tmp>/logs``.  When a :class:`Pipeline` closes without an error it
greps those logs for the patient names, IDs and birth dates of every data set it sent
(:func:`assert_no_phi_in_logs`), so every scenario also checks that nothing it ran logged patient data.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.peers import Orthanc, RedisServer, get_free_port
from tests.utils import make_instance, wait_for

REPO = Path(__file__).resolve().parent.parent
BUILTIN_MODELS = ("asg_mammonet", "clgb_net", "lem", "hybrid_birads", "us_fusion")
#: Modalities of the objects we send back (SR and the heatmap Secondary Captures).
OUTPUT_MODALITIES = ("SR", "OT")


# --------------------------------------------------------------------------------------------- data


def phi_study(
    number: int, *, rows: int = 32, cols: int = 24, seed: int = 0, study_uid: str | None = None
) -> list[Dataset]:
    """A 4-view MG study of small images of patient ``SYNTH^PATIENTnnnn``, with its own ID and birth date.

    Every study gets distinct identifiers, so a log grep for them cannot match by accident.

    :param number: The patient number nnnn (also seeds the identifiers).
    :param rows: Image rows.
    :param cols: Image columns.
    :param seed: Seeds the pixels; two studies with different seeds differ in content.
    :param study_uid: The Study Instance UID; a new one by default.
    """
    study_uid = study_uid or generate_uid()
    series = generate_uid()
    datasets = []
    for index, (laterality, view) in enumerate((("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))):
        ds = make_instance(
            study_uid=study_uid,
            series_uid=series,
            laterality=laterality,
            view=view,
            rows=rows,
            cols=cols,
            seed=seed * 10 + index,
            patient_name=f"SYNTH^PATIENT{number:04d}",
            patient_id=f"PID{7_300_000 + number * 7:07d}",
        )
        ds.PatientBirthDate = f"19{40 + number % 50:02d}{1 + number % 12:02d}{1 + number % 27:02d}"
        ds.InstanceNumber = index + 1
        datasets.append(ds)
    return datasets


def phi_of(datasets: Iterable[Dataset]) -> set[str]:
    """The patient names (whole and by component), IDs and birth dates of *datasets*."""
    found: set[str] = set()
    for ds in datasets:
        name = str(ds.get("PatientName", "") or "")
        if name:
            found.add(name)
            found.update(part for part in name.split("^") if len(part) >= 6 and part != "SYNTH")
        for keyword in ("PatientID", "PatientBirthDate"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 6:
                found.add(value)
    return found


def assert_no_phi_in_logs(log_files: Iterable[Path], phi: set[str]) -> None:
    """Fail naming the file and the identifier if any log holds one of *phi*."""
    leaks = []
    for path in log_files:
        text = path.read_text(errors="replace")
        for value in sorted(phi):
            if value in text:
                line = next(line for line in text.splitlines() if value in line)
                leaks.append(f"{path.name}: {value!r} in: {line[:300]}")
    if leaks:
        raise AssertionError("patient data in the logs:\n" + "\n".join(leaks))


# --------------------------------------------------------------------------------------------- peers


def restart_orthanc(orthanc: Orthanc, timeout: float = 60.0) -> None:
    """Start a stopped :class:`~tests.peers.Orthanc` again on the same ports and storage."""
    with orthanc.log_path.open("ab") as log:
        orthanc.process = subprocess.Popen(
            [str(Path("/usr/sbin/Orthanc")), str(orthanc.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=orthanc.workdir,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    orthanc._wait_ready(timeout)


def orthanc_study_instances(orthanc: Orthanc, study_uid: str) -> list[str]:
    """SOP Instance UIDs of every instance Orthanc holds in *study_uid*, one entry per stored instance."""
    request = urllib.request.Request(orthanc.url + "/tools/lookup", data=study_uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        matches = json.loads(response.read())
    ids = [m["ID"] for m in matches if m.get("Type") == "Study"]
    if not ids:
        return []
    return [
        str(i["MainDicomTags"]["SOPInstanceUID"]) for i in orthanc.get_json(f"/studies/{ids[0]}/instances")
    ]


# --------------------------------------------------------------------------------------------- pipeline


def _stop_group(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def children_of(pid: int) -> list[int]:
    """The direct children of *pid* (from /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def _echo(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    if assoc.is_established:
        assoc.release()
        return True
    return False


class Pipeline:
    """Gateway, workers, a private Redis and an Orthanc PACS, with their configuration, under one directory.

    :param workdir: An empty directory (``tmp_path``).
    :param models: ``probe`` (the tiny ``fault_probe`` drop-in model) or a list of built-in model names.
    :param probe_options: ``plugins.models.fault_probe.options`` (``sleep_seconds``, ``marker_dir``).
    :param orthanc: Start an Orthanc and deliver to it.
    :param persistent_redis: Run Redis with an fsynced append-only file.
    :param config: Sections merged over the defaults below (one level deep).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        models: str | Sequence[str] = "probe",
        probe_options: dict[str, Any] | None = None,
        orthanc: bool = True,
        persistent_redis: bool = True,
        config: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.port = get_free_port()
        self.phi: set[str] = set()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._sends = 0
        self.redis = RedisServer(workdir / "redis", persistent=persistent_redis)
        self.orthanc: Orthanc | None = None
        try:
            if orthanc:
                self.orthanc = Orthanc(workdir / "orthanc")
            self.config_path = self._write_config(models, probe_options or {}, config or {})
        except BaseException:
            self.redis.stop()
            raise

    def _write_config(
        self, models: str | Sequence[str], probe_options: dict[str, Any], extra: dict[str, dict[str, Any]]
    ) -> Path:
        if models == "probe":
            plugins: dict[str, Any] = {
                "drop_in_dir": str(REPO / "tests" / "fault_plugins"),
                "load_entrypoints": False,
                "disabled": list(BUILTIN_MODELS),
                "allow_demo_weights": True,
                "models": {"fault_probe": {"batch_size": 4, "options": probe_options}},
            }
            first = "fault_probe"
        else:
            plugins = {
                "load_entrypoints": False,
                "allow_demo_weights": True,
                "disabled": [m for m in BUILTIN_MODELS if m not in models],
            }
            first = list(models)[0]
        destinations = (
            []
            if self.orthanc is None
            else [{"ae_title": self.orthanc.aet, "host": "127.0.0.1", "port": self.orthanc.dicom_port}]
        )
        data: dict[str, dict[str, Any]] = {
            "gateway": {"port": self.port, "host": "127.0.0.1", "data_dir": str(self.data_dir)},
            "assembly": {"quiet_seconds": 1.0, "tick_seconds": 0.1},
            "broker": {"url": self.redis.url, "visibility_timeout_seconds": 1},
            "dispatch": {"kind": "celery"},
            "logging": {"level": "INFO", "json_output": True},
            "plugins": plugins,
            "triage": {"first_stage_model": first},
            "delivery": {
                "destinations": destinations,
                "max_retries": 30,
                "backoff_base_seconds": 0.5,
                "backoff_max_seconds": 2,
            },
            # Short limits keep the Redis visibility timeout (2 x (time limit + longest backoff)) short,
            # so work a killed worker held comes back within a test.
            "worker": {"soft_time_limit_seconds": 10, "time_limit_seconds": 12, "max_redeliveries": 3},
        }
        for section, values in extra.items():
            data[section] = {**data.get(section, {}), **values}
        path = self.workdir / "pacs-triage.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    @property
    def visibility_timeout(self) -> float:
        """The Redis visibility timeout the workers run with (the rule of ``workers/app.py``, which the
        test process does not configure, so as not to repoint the global Celery app)."""
        from gateway.settings import load_settings

        settings = load_settings(self.config_path, environ={})
        longest = settings.worker.time_limit_seconds + settings.delivery.backoff_max_seconds
        return max(settings.broker.visibility_timeout_seconds, int(longest * 2))

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "workers.cli", *args, "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )

    def start_gateway(self, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        self.gateway = self._spawn("gateway", "gateway")
        gateway = self.gateway

        def listening() -> bool:
            if gateway.poll() is not None:
                raise AssertionError(
                    f"the gateway exited ({gateway.returncode}):\n{self.log_tail('gateway')}"
                )
            return _echo(self.port)

        wait_for(listening, timeout=timeout, interval=0.3)
        return gateway

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            _stop_group(self.gateway)

    def start_worker(
        self,
        name: str = "worker",
        queues: str = "analysis,delivery",
        wait_ready: bool = True,
        timeout: float = 90.0,
    ) -> subprocess.Popen[bytes]:
        """Start ``pacs-triage worker --concurrency 1`` (a main process and one pool child)."""
        log = self.logs / f"{name}.log"
        already = log.read_text(errors="replace").count(" ready.") if log.exists() else 0
        worker = self._spawn(name, "worker", "--queues", queues, "--concurrency", "1")
        self.workers[name] = worker
        if wait_ready:

            def ready() -> bool:
                if worker.poll() is not None:
                    raise AssertionError(
                        f"worker {name} exited ({worker.returncode}):\n{self.log_tail(name)}"
                    )
                return log.read_text(errors="replace").count(" ready.") > already

            wait_for(ready, timeout=timeout, interval=0.3)
        return worker

    def kill_worker(self, name: str) -> None:
        """kill -9 of a whole worker node: its main process and its pool children at once."""
        worker = self.workers[name]
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)

    def stop_worker(self, name: str) -> None:
        _stop_group(self.workers[name])

    def log_tail(self, name: str, limit: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-limit:] if path.exists() else ""

    def close(self, check_logs: bool = True) -> None:
        for worker in self.workers.values():
            _stop_group(worker)
        self.stop_gateway()
        if self.orthanc is not None:
            self.orthanc.stop()
        self.redis.stop()
        if check_logs:
            assert_no_phi_in_logs(sorted(self.logs.glob("*.log")), self.phi)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.close(check_logs=exc_type is None)

    # ------------------------------------------------------------------ sending

    def send(
        self, datasets: Sequence[Dataset], associations: int = 1, timeout: float = 120.0, check: bool = True
    ) -> list[subprocess.CompletedProcess[bytes]]:
        """C-STORE *datasets* with DCMTK ``storescu``, split over *associations* parallel processes."""
        self.phi |= phi_of(datasets)
        self._sends += 1
        folders = []
        for index in range(associations):
            folder = self.workdir / "send" / f"{self._sends:03d}-{index}"
            folder.mkdir(parents=True)
            folders.append(folder)
        for index, ds in enumerate(datasets):
            ds.save_as(folders[index % associations] / f"{index:05d}.dcm", enforce_file_format=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        with (self.logs / "storescu.log").open("ab") as log:
            processes = [
                subprocess.Popen(
                    [
                        "storescu",
                        "-aet",
                        "MODALITY",
                        "-aec",
                        "PACS_TRIAGE",
                        "+sd",
                        "127.0.0.1",
                        str(self.port),
                        str(folder),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                for folder in folders
                if any(folder.iterdir())
            ]
            results = []
            for process in processes:
                process.wait(timeout=timeout)
                results.append(subprocess.CompletedProcess(process.args, process.returncode))
        if check:
            failed = [r for r in results if r.returncode != 0]
            if failed:
                raise AssertionError(
                    f"storescu failed ({failed[0].returncode}):\n{self.log_tail('storescu')}"
                )
        return results

    def c_store(self, datasets: Sequence[Dataset], calling_ae: str = "MODALITY") -> list[int | None]:
        """C-STORE *datasets* over one pynetdicom association; the status of each (None: no response)."""
        self.phi |= phi_of(datasets)
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACS_TRIAGE")
        if not assoc.is_established:
            raise AssertionError("the gateway refused the association")
        statuses = []
        for ds in datasets:
            response = assoc.send_c_store(ds)
            statuses.append(int(response.Status) if "Status" in response else None)
        assoc.release()
        return statuses

    def c_store_file(self, path: Path, calling_ae: str = "MODALITY") -> int | None:
        """C-STORE the file at *path* as it is (pynetdicom sends its bytes undecoded); the status."""
        from pydicom import dcmread

        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=[(0x0010, 0x0010)])
        self.phi |= phi_of([ds])
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", self.port, ae_title="PACS_TRIAGE")
        if not assoc.is_established:
            raise AssertionError("the gateway refused the association")
        response = assoc.send_c_store(path)
        assoc.release()
        return int(response.Status) if "Status" in response else None

    # ------------------------------------------------------------------ journals

    def journal(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.data_dir / "journal.sqlite", timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def results(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.data_dir / "results.sqlite", timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def results_ready(self) -> bool:
        """The workers' results store exists with its tables (the file appears a moment before its schema)."""
        if not (self.data_dir / "results.sqlite").exists():
            return False
        with self.results() as db:
            return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'worklist'").fetchone() is not None

    def acknowledged(self) -> dict[str, set[str]]:
        """Study UID -> SOP Instance UIDs the gateway committed (and so acknowledged or was about to)."""
        studies: dict[str, set[str]] = {}
        with self.journal() as db:
            for row in db.execute("SELECT study_uid, sop_uid FROM instances"):
                studies.setdefault(row["study_uid"], set()).add(row["sop_uid"])
        return studies

    def latest_versions(self) -> dict[str, int]:
        with self.journal() as db:
            return {
                r[0]: int(r[1]) for r in db.execute("SELECT study_uid, MAX(version) FROM studies GROUP BY 1")
            }

    def dead_letters(self) -> list[sqlite3.Row]:
        if not self.results_ready():
            return []
        with self.results() as db:
            return db.execute("SELECT * FROM deadletters WHERE replayed_at IS NULL").fetchall()

    def settled(self, study_uids: Iterable[str]) -> bool:
        """Every study's latest version is delivered or dead-lettered in the workers' journal."""
        if not self.results_ready():
            return False
        versions = self.latest_versions()
        with self.results() as db:
            rows = {r["study_uid"]: r for r in db.execute("SELECT * FROM worklist")}
        for uid in study_uids:
            row = rows.get(uid)
            if (
                row is None
                or int(row["version"]) != versions.get(uid)
                or row["state"] not in ("delivered", "dead-lettered")
            ):
                return False
        return True

    def wait_settled(self, study_uids: Iterable[str], timeout: float = 120.0) -> None:
        uids = list(study_uids)
        try:
            wait_for(lambda: self.settled(uids), timeout=timeout, interval=0.5)
        except AssertionError:
            names = [n for n in ("gateway", *self.workers) if (self.logs / f"{n}.log").exists()]
            tails = "\n".join(f"--- {n}\n{self.log_tail(n, 2500)}" for n in names)
            raise AssertionError(f"studies not delivered within {timeout} s\n{tails}") from None

    def expected_outputs(self, study_uid: str) -> tuple[set[str], bool]:
        """The SOP UIDs of every output the workers made for *study_uid* (all versions), and whether any
        of its work is dead-lettered."""
        outputs: set[str] = set()
        with self.journal() as gw:
            jobs = [
                r[0]
                for r in gw.execute(
                    "SELECT job_id FROM studies WHERE study_uid = ? AND job_id IS NOT NULL", (study_uid,)
                )
            ]
        with self.results() as db:
            for job in jobs:
                for row in db.execute("SELECT outputs FROM analyses WHERE job_id = ?", (job,)):
                    outputs.update(Path(p).stem for p in json.loads(row["outputs"]))
            dead = (
                bool(jobs)
                and db.execute(
                    "SELECT COUNT(*) FROM deadletters WHERE replayed_at IS NULL"
                    f" AND job_id IN ({','.join('?' * len(jobs))})",
                    jobs,
                ).fetchone()[0]
                > 0
            )
        return outputs, dead

    def check_invariant(self, study_uids: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Assert the suite's invariant for *study_uids* (default: every study the gateway acknowledged).

        :returns: Study UID -> SOP UIDs of its outputs in Orthanc.
        """
        if self.orthanc is None:
            raise RuntimeError(
                "the invariant is checked against Orthanc; start the pipeline with orthanc=True"
            )
        acknowledged = self.acknowledged()
        versions = self.latest_versions()
        uids = list(acknowledged) if study_uids is None else list(study_uids)
        in_pacs: dict[str, list[str]] = {}
        with self.journal() as gw, self.results() as db:
            for uid in uids:
                assert uid in acknowledged, f"study {uid} was never acknowledged"
                job = gw.execute(
                    "SELECT job_id FROM studies WHERE study_uid = ? AND version = ?", (uid, versions[uid])
                ).fetchone()[0]
                assert job, f"study {uid} v{versions[uid]} was never dispatched"
                outputs, dead = self.expected_outputs(uid)
                analysed: set[str] = set()
                for row in db.execute("SELECT predictions, failures FROM analyses WHERE job_id = ?", (job,)):
                    analysed |= {p["sop_instance_uid"] for p in json.loads(row["predictions"])}
                    analysed |= {f["sop_instance_uid"] for f in json.loads(row["failures"])}
                stored = orthanc_study_instances(self.orthanc, uid)
                in_pacs[uid] = stored
                if dead:
                    continue  # visibly dead-lettered: listed by `pacs-triage deadletters`
                assert acknowledged[uid] <= analysed, (
                    f"study {uid}: acknowledged but not analysed: {sorted(acknowledged[uid] - analysed)}"
                )
                assert len(stored) == len(set(stored)), f"study {uid}: an instance is in the PACS twice"
                assert set(stored) == outputs, (
                    f"study {uid}: PACS holds {len(stored)} outputs, the workers made {len(outputs)}; "
                    f"missing {sorted(outputs - set(stored))}, unexpected {sorted(set(stored) - outputs)}"
                )
                assert outputs, f"study {uid}: analysed but no output was made"
                statuses = {
                    r["status"]
                    for r in db.execute(
                        f"SELECT status FROM deliveries WHERE sop_uid IN ({','.join('?' * len(outputs))})",
                        sorted(outputs),
                    )
                }
                assert statuses == {"stored"}, f"study {uid}: delivery journal says {statuses}"
        return in_pacs


def incoming_leftovers(data_dir: Path) -> list[Path]:
    """Files left in the gateway's ``incoming/`` (half-received data sets)."""
    incoming = data_dir / "incoming"
    return sorted(incoming.iterdir()) if incoming.exists() else []


def wait_until(deadline_seconds: float) -> None:
    """Sleep until ``time.time()`` reaches *deadline_seconds* (no-op if already past)."""
    delay = deadline_seconds - time.time()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------------------------- load


def process_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of *pid* in KiB from ``/proc/<pid>/status``; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


class MemorySampler:
    """Samples the resident memory of the pipeline's processes every *interval* seconds in a thread.

    Processes are found afresh at each sample (a worker's pool child may be replaced): ``gateway``,
    ``<worker>`` (the Celery main process), ``<worker>-pool`` (its pool children, summed), ``orthanc``
    and ``redis``.  ``samples`` holds ``(seconds since start, {name: RSS KiB})``; ``peak_kib`` the highest
    VmHWM (peak resident set) seen per name.
    """

    def __init__(self, pipeline: Pipeline, interval: float = 2.0) -> None:
        import threading

        self.pipeline = pipeline
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def processes(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        pipeline = self.pipeline
        if pipeline.gateway is not None and pipeline.gateway.poll() is None:
            found["gateway"] = [pipeline.gateway.pid]
        for name, worker in pipeline.workers.items():
            if worker.poll() is None:
                found[name] = [worker.pid]
                found[f"{name}-pool"] = children_of(worker.pid)
        if pipeline.orthanc is not None and pipeline.orthanc.process.poll() is None:
            found["orthanc"] = [pipeline.orthanc.process.pid]
        if pipeline.redis.process is not None and pipeline.redis.process.poll() is None:
            found["redis"] = [pipeline.redis.process.pid]
        return found

    def sample(self) -> dict[str, int]:
        """Take one sample now and return it (RSS KiB per name)."""
        now: dict[str, int] = {}
        for name, pids in self.processes().items():
            total = 0
            for pid in pids:
                memory = process_memory(pid)
                if memory is None:
                    continue
                total += memory[0]
                self.peak_kib[name] = max(self.peak_kib.get(name, 0), memory[1])
            if total:
                now[name] = total
        self.samples.append((round(time.monotonic() - self._started, 1), now))
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile by nearest rank (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def study_timings(pipeline: Pipeline, study_uids: Iterable[str]) -> list[dict[str, float]]:
    """Per study: first and last instance received (gateway journal) and its outputs delivered to the PACS
    (the workers' ``delivered`` event, after the last C-STORE of the SR and heatmaps), as epoch seconds."""
    rows = []
    with pipeline.journal() as gw, pipeline.results() as db:
        for uid in study_uids:
            first, last = gw.execute(
                "SELECT MIN(received_at), MAX(received_at) FROM instances WHERE study_uid = ?", (uid,)
            ).fetchone()
            (job,) = db.execute("SELECT job_id FROM worklist WHERE study_uid = ?", (uid,)).fetchone()
            delivered = db.execute(
                "SELECT MIN(at) FROM timeline WHERE job_id = ? AND event = 'delivered'", (job,)
            ).fetchone()[0]
            rows.append(
                {
                    "first_received": first,
                    "last_received": last,
                    "delivered": delivered,
                    "latency": delivered - last,
                }
            )
    return rows


SAME_PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
)


def mixed_studies(
    mg: int, us: int, mg_size: tuple[int, int], us_size: tuple[int, int], us_frames: int, seed: int = 1000
) -> list[list]:
    """*mg* 4-view mammograms and *us* ultrasound studies (a multi-frame cine loop and a single frame each),
    interleaved the way a department's studies arrive."""
    from plugins import synthetic

    studies = []
    for index in range(mg):
        label = ("normal", "benign", "malignant")[index % 3]
        studies.append(synthetic.make_mg_study(seed=seed + index, label=label, size=mg_size))
    for index in range(us):
        label = ("benign", "malignant")[index % 2]
        loop = synthetic.make_us_image(
            seed=seed + 500 + index, label=label, size=us_size, frames=us_frames
        ).dataset
        still = synthetic.make_us_image(
            seed=seed + 700 + index,
            label=label,
            size=us_size,
            instance_number=2,
            study_uid=str(loop.StudyInstanceUID),
        ).dataset
        for keyword in SAME_PATIENT_AND_STUDY:  # one patient, one study: the still copies the loop's
            if keyword in loop:
                setattr(still, keyword, loop.data_element(keyword).value)
        studies.append([loop, still])
    order = []
    mg_studies, us_studies = studies[:mg], studies[mg:]
    while mg_studies or us_studies:  # about one US study between every few mammograms
        for _ in range(max(1, round(mg / max(us, 1)))):
            if mg_studies:
                order.append(mg_studies.pop(0))
        if us_studies:
            order.append(us_studies.pop(0))
    return order


def send_studies(pipeline: Pipeline, studies: list[list], associations: int) -> float:
    """Write the studies into one folder per association (whole studies, round robin) and run one ``storescu``
    per folder, all at once.  Returns the seconds the sending took."""
    root = pipeline.workdir / "send" / f"studies-{time.monotonic_ns()}"
    folders = [root / f"association-{n}" for n in range(associations)]
    for folder in folders:
        folder.mkdir(parents=True)
    for index, study in enumerate(studies):
        pipeline.phi |= phi_of(study)
        for ds in study:
            ds.save_as(folders[index % associations] / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    started = time.monotonic()
    with (pipeline.logs / "storescu.log").open("ab") as log:
        processes = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aet",
                    f"MODALITY{n}",
                    "-aec",
                    "PACS_TRIAGE",
                    "+sd",
                    "127.0.0.1",
                    str(pipeline.port),
                    str(folder),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            for n, folder in enumerate(folders)
        ]
        for process in processes:
            if process.wait(timeout=3600) != 0:
                raise RuntimeError(
                    f"storescu exited with {process.returncode}: {pipeline.log_tail('storescu')}"
                )
    return time.monotonic() - started
