"""Receive benchmark: the gateway against DCMTK's storescp on the same files, sent by DCMTK storescu.

Generates two sets of uncompressed DICOM instances once into a cache directory (random pixel
data, so nothing can compress), then for each set and for 1 and 4 parallel associations runs
every receiver in turn on a fresh output directory on the same disk: storescp at its best
settings, the same storescp with one ``sync`` of its output at the end (durable, as the gateway
is), storescp ``--ignore`` (which discards: a ceiling, not a peer), and ``pacs-triage gateway``
with 1, 2 and 4 receiving processes.  Wall time runs from the start of the first storescu to the
exit of the last one; every run is checked to have stored every instance.  The matrix runs in
rounds and the table shows each configuration's best run.  See README.md for the results.

Only public tools are used: storescu/storescp/echoscu from DCMTK, the gateway's own CLI,
``time.perf_counter`` and the receivers' CPU time read from ``/proc``.

Usage::

    .venv/bin/python benchmarks/gateway/bench_receive.py            # full run (5-9 min, ~8 GB of disk at peak)
    .venv/bin/python benchmarks/gateway/bench_receive.py --quick    # scaled-down run (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

REPO = Path(__file__).resolve().parents[2]
PACS_TRIAGE = REPO / ".venv" / "bin" / "pacs-triage"
GATEWAY_AE = "PACS_TRIAGE"
#: storescp's largest accepted max PDU (DCMTK caps its command-line value at 128 KiB).
STORESCP_MAX_PDU = 131072
MG_STORAGE = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# ------------------------------------------------------------------------------------ data sets

@dataclass(frozen=True)
class SetSpec:
    name: str
    count: int
    rows: int
    columns: int
    modality: str
    sop_class: str
    per_study: int


def _dataset(spec: SetSpec, index: int, study_uid: str, series_uid: str, pixels: bytes) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = spec.sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = f"BENCH^{index // spec.per_study:04d}"
    ds.PatientID = f"BENCH{index // spec.per_study:06d}"
    ds.StudyDate = "20240101"
    ds.Modality = spec.modality
    ds.InstanceNumber = index % spec.per_study + 1
    if spec.modality == "MG":
        # Four standard views per study, so the gateway's assembler completes each study at once.
        laterality, view = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")][index % 4]
        ds.ImageLaterality = laterality
        ds.ViewPosition = view
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    return ds


def generate(spec: SetSpec, target: Path, groups: int) -> None:
    """Write *spec.count* instances into ``target/g0..g{groups-1}`` (round-robin by study)."""
    rng = np.random.default_rng(20240101)
    nbytes = spec.rows * spec.columns * 2
    # One pool of random bytes, sliced at a different offset per instance: every file differs and
    # nothing compresses, without paying for fresh random numbers per instance.
    pool = rng.bytes(nbytes + (1 << 20))
    study_uid = series_uid = ""
    for index in range(spec.count):
        if index % spec.per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        group = target / f"g{(index // spec.per_study) % groups}"  # whole studies per association
        group.mkdir(parents=True, exist_ok=True)
        offset = int(rng.integers(0, 1 << 20))
        ds = _dataset(spec, index, study_uid, series_uid, pool[offset:offset + nbytes])
        ds.save_as(group / f"{index:05d}.dcm", enforce_file_format=True)


def ensure_set(spec: SetSpec, cache: Path, groups: int) -> tuple[Path, list[Path], int]:
    """The set's directory, its per-group folders and its total bytes; generated if missing."""
    target = cache / f"{spec.name}-{spec.count}x{spec.rows}x{spec.columns}"
    marker = target / "complete.json"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        generate(spec, target, groups)
        total = sum(p.stat().st_size for p in target.rglob("*.dcm"))
        marker.write_text(json.dumps({"bytes": total, "spec": asdict(spec)}))
        print(f"  generated {spec.count} {spec.name} instances ({total / 1e6:.0f} MB) "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
    total = int(json.loads(marker.read_text())["bytes"])
    folders = sorted(p for p in target.iterdir() if p.is_dir())
    return target, folders, total


# ------------------------------------------------------------------------------------ receivers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listeners_on(port: int) -> int:
    """How many sockets listen on *port* (SO_REUSEPORT lets several processes share one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    count += 1
    return count


def tree_cpu_seconds(root_pid: int) -> float:
    """User+system CPU of a process, its live descendants and its reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        stats[int(entry.name)] = (ppid, (utime + stime + cutime + cstime) / tick)
    total, frontier = 0.0, [root_pid]
    while frontier:
        pid = frontier.pop()
        if pid in stats:
            total += stats[pid][1]
            frontier.extend(child for child, (ppid, _) in stats.items() if ppid == pid)
    return total


@dataclass
class Receiver:
    """One way of receiving: a label, how it is started and how its stored files are counted."""

    label: str
    kind: str  # "storescp" or "gateway"
    options: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    receive_processes: int = 1
    counts_for_ratio: bool = True
    #: storescp never fsyncs; this variant's time includes one ``sync -f`` of its output at the end.
    sync_after: bool = False
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    out: Path | None = None

    def start(self, out: Path) -> None:
        self.out, self.port = out, free_port()
        out.mkdir(parents=True)
        env = {**os.environ, **self.env}
        log_path = out.parent / f"{out.name}.log"
        if self.kind == "storescp":
            command = ["storescp", *self.options, "-aet", GATEWAY_AE, "-od", str(out / "files"),
                       str(self.port)]
            (out / "files").mkdir()
        else:
            config = out / "gateway.yaml"
            config.write_text(gateway_config(out / "data", self.port, self.receive_processes, self.options))
            command = [str(PACS_TRIAGE), "gateway", "--config", str(config)]
        with log_path.open("wb") as log:  # the receiver keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 60
        while listeners_on(self.port) < self.receive_processes:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.label} did not start; its output ends with:\n{tail}")
            time.sleep(0.1)
        # The listening socket exists before pynetdicom serves it: one echo proves it answers.
        for _ in range(100):
            if subprocess.run(["echoscu", "-aec", GATEWAY_AE, "127.0.0.1", str(self.port)],
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} does not answer C-ECHO")

    def stored(self) -> int:
        if self.out is None:
            raise RuntimeError(f"{self.label} was never started")
        if self.kind == "storescp":
            return sum(1 for _ in (self.out / "files").iterdir())
        db = sqlite3.connect(self.out / "data" / "journal.sqlite", timeout=30)
        try:
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        finally:
            db.close()

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


def gateway_config(data_dir: Path, port: int, receive_processes: int, extra: list[str]) -> str:
    lines = [
        "gateway:",
        f"  port: {port}",
        "  host: 127.0.0.1",
        f"  data_dir: {data_dir}",
        f"  receive_processes: {receive_processes}",
        "  disk_watermark: {min_free_bytes: 1073741824, min_free_percent: 1}",
        *[f"  {option}" for option in extra],
        "logging:",
        "  level: WARNING",
        "  json_output: true",
        "dispatch:",
        "  kind: logging",
    ]
    return "\n".join(lines) + "\n"


def receivers(args: argparse.Namespace) -> list[Receiver]:
    nodelay = {"TCP_NODELAY": "1"}
    # storescp at its best: TCP_NODELAY, the largest PDU it accepts, bit-preserving writes (the
    # received stream goes to disk without being parsed and re-encoded), a fork per association so
    # that parallel associations are served in parallel, and no reverse DNS lookups.
    best = ["--fork", "-pdu", str(STORESCP_MAX_PDU), "+B", "-dhl"]
    chosen = [
        Receiver("storescp (best)", "storescp", best, nodelay),
        Receiver("storescp (best) + sync at end", "storescp", best, nodelay, counts_for_ratio=False,
                 sync_after=True),
        Receiver("storescp --ignore (discards)", "storescp", [*best, "--ignore"], nodelay,
                 counts_for_ratio=False),
    ]
    if args.storescp_variants:
        chosen += [
            Receiver("storescp defaults + NODELAY", "storescp", [], nodelay, counts_for_ratio=False),
            Receiver("storescp --fork -pdu 128K", "storescp", ["--fork", "-pdu", str(STORESCP_MAX_PDU)],
                     nodelay, counts_for_ratio=False),
            Receiver("storescp --fork +B", "storescp", ["--fork", "+B"], nodelay, counts_for_ratio=False),
        ]
    gateway_options = [f"max_pdu_size: {args.gateway_pdu}"]
    for processes in args.processes:
        chosen.append(Receiver(f"gateway, {processes} process{'es' if processes > 1 else ''}", "gateway",
                               gateway_options, receive_processes=processes))
    return chosen


# ------------------------------------------------------------------------------------ a run

@dataclass
class Result:
    set: str
    associations: int
    receiver: str
    kind: str
    counts_for_ratio: bool
    instances: int
    bytes: int
    seconds: float
    receiver_cpu_s: float
    sender_cpu_s: float
    synced: bool = False
    round: int = 1

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def send(folders: list[Path], associations: int, port: int) -> None:
    """Run *associations* storescu processes in parallel, each sending its share of *folders*."""
    shares: list[list[Path]] = [folders[i::associations] for i in range(associations)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    procs = []
    for share in shares:
        command = ["storescu", "-aet", "BENCH", "-aec", GATEWAY_AE, "-R", "+sd", "+r", "-nh",
                   "127.0.0.1", str(port), *(str(p) for p in share)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    failures = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(err.decode(errors="replace")[-2000:])
    if failures:
        raise RuntimeError("storescu failed:\n" + "\n".join(failures))


def run_one(receiver: Receiver, set_name: str, folders: list[Path], count: int, total_bytes: int,
            associations: int, work: Path, round_number: int = 1) -> Result:
    out = work / f"{set_name}-{associations}-{receiver.label.split(',')[0].split()[0]}-{time.monotonic_ns()}"
    subprocess.run(["sync"], check=False)  # earlier runs' dirty pages must not be flushed during this one
    receiver.start(out)
    try:
        pid = receiver.process.pid if receiver.process else 0
        cpu_before, sender_before = tree_cpu_seconds(pid), children_cpu()
        started = time.perf_counter()
        send(folders, associations, receiver.port)
        if receiver.sync_after:
            subprocess.run(["sync", "-f", str(out)], check=True)
        seconds = time.perf_counter() - started
        cpu = tree_cpu_seconds(pid) - cpu_before
        sender_cpu = children_cpu() - sender_before
        stored = receiver.stored()
        if stored != count and "--ignore" not in receiver.options:
            raise RuntimeError(f"{receiver.label} stored {stored} of {count} instances")
    finally:
        receiver.stop()
        shutil.rmtree(out, ignore_errors=True)
        (out.parent / f"{out.name}.log").unlink(missing_ok=True)
    result = Result(set_name, associations, receiver.label, receiver.kind, receiver.counts_for_ratio, count,
                    total_bytes, seconds, cpu, sender_cpu, receiver.sync_after, round_number)
    print(f"  {set_name:5} x{associations}  {receiver.label:32} {seconds:7.2f} s"
          f"  {result.per_second:8.1f} inst/s  {result.mb_per_second:7.1f} MB/s"
          f"  receiver CPU {cpu:6.1f} s  storescu CPU {sender_cpu:5.1f} s", flush=True)
    return result


# ------------------------------------------------------------------------------------ report

def best_of(results: list[Result]) -> list[Result]:
    """Each configuration's fastest run, in first-run order."""
    best: dict[tuple[str, int, str], Result] = {}
    for r in results:
        key = (r.set, r.associations, r.receiver)
        if key not in best or r.seconds < best[key].seconds:
            best[key] = r
    return list(best.values())


def table(results: list[Result]) -> str:
    """A Markdown table of each configuration's best run, with ratios against storescp.

    "vs storescp" and "vs storescp + sync" divide the gateway's best by storescp's best (same
    set and association count): storescp at its best settings (the goal's reference), and the
    same storescp with one ``sync`` of its output at the end (durable, like the gateway).  The
    last column is the range of the ratio to storescp within each round, where the two ran
    minutes apart: on a shared machine it shows how much of a difference is noise.
    """
    lines = [
        "| set | assoc. | receiver | inst/s | MB/s | receiver CPU s | vs storescp | vs storescp + sync "
        "| per-round ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def reference(pool: list[Result], r: Result, synced: bool) -> Result | None:
        return next((x for x in pool if x.set == r.set and x.associations == r.associations
                     and x.kind == "storescp" and (x.counts_for_ratio or synced) and x.synced == synced),
                    None)

    best = best_of(results)
    for r in best:
        cells = ["-", "-", "-"]
        if r.kind == "gateway":
            for column, synced in enumerate((False, True)):
                if ref := reference(best, r, synced):
                    cells[column] = f"{r.per_second / ref.per_second:.2f}x"
            paired = []
            for run in results:
                if (run.set, run.associations, run.receiver) == (r.set, r.associations, r.receiver):
                    same_round = [x for x in results if x.round == run.round]
                    if ref := reference(same_round, run, False):
                        paired.append(run.per_second / ref.per_second)
            if paired:
                cells[2] = f"{min(paired):.2f}-{max(paired):.2f}x" if len(paired) > 1 else f"{paired[0]:.2f}x"
        lines.append(f"| {r.set} | {r.associations} | {r.receiver} | {r.per_second:.1f} "
                     f"| {r.mb_per_second:.1f} | {r.receiver_cpu_s:.1f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="scaled-down run: 24 large and 400 small instances, one round")
    parser.add_argument("--large", type=int, default=200, help="mammography-sized instances (default 200)")
    parser.add_argument("--small", type=int, default=2000, help="CT-sized instances (default 2000)")
    parser.add_argument("--sets", default="large,small", help="which sets to run (default large,small)")
    parser.add_argument("--associations", default="1,4", help="parallel associations to try (default 1,4)")
    parser.add_argument("--processes", default="1,2,4",
                        help="gateway.receive_processes values to try (default 1,2,4)")
    parser.add_argument("--gateway-pdu", type=int, default=1 << 20,
                        help="gateway max_pdu_size (default 1 MiB; the shipped config uses 256 KiB)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="rounds over every configuration; the table shows each one's best (default 2)")
    parser.add_argument("--storescp-variants", action="store_true",
                        help="also run storescp with weaker option sets, to show which options matter")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "pacs-triage-bench-cache",
                        help="where generated instances are kept between runs")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where receivers write (default: next to the cache, i.e. the same disk)")
    parser.add_argument("--keep-cache", action="store_true", help="keep the generated instances afterwards")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.large, args.small, args.repeat = min(args.large, 24), min(args.small, 400), 1
    args.processes = [int(x) for x in args.processes.split(",")]
    associations = [int(x) for x in args.associations.split(",")]
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"DCMTK's {tool} is not on PATH (apt-get install dcmtk)")

    specs = {
        "large": SetSpec("large", args.large, 3328, 2560, "MG", MG_STORAGE, per_study=4),
        "small": SetSpec("small", args.small, 512, 512, "CT", CT_STORAGE, per_study=50),
    }
    work = args.work_dir or args.cache_dir.parent / "pacs-triage-bench-work"
    work.mkdir(parents=True, exist_ok=True)
    dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True).stdout.split()[2]
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, DCMTK {dcmtk}",
          flush=True)
    results: list[Result] = []
    started = time.perf_counter()
    try:
        # Rounds, not back-to-back repeats: a burst of load from elsewhere on a shared machine then
        # hits one run of each configuration instead of every run of one.
        for round_number in range(1, args.repeat + 1):
            print(f"round {round_number} of {args.repeat}", flush=True)
            for set_name in args.sets.split(","):
                spec = specs[set_name]
                _, folders, total_bytes = ensure_set(spec, args.cache_dir, groups=4)
                for n in associations:
                    for receiver in receivers(args):
                        results.append(run_one(receiver, set_name, folders, spec.count, total_bytes, n, work,
                                               round_number))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_cache:
            shutil.rmtree(args.cache_dir, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"inst_per_s": r.per_second, "mb_per_s": r.mb_per_second}
                                         for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
