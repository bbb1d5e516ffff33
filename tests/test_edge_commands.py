"""Around the edge: ``send`` goes on past bad files, ``up`` stops whole, one gateway per data dir."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.datalock import LOCK_NAME
from gateway.service import GatewayService
from tests.conftest import gateway_settings
from tests.utils import get_port, make_instance, write

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayService]:
    service = GatewayService(gateway_settings(tmp_path))
    service.start()
    yield service
    service.stop()


def _config(tmp_path: Path, name: str, **sections: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def test_send_reports_each_bad_file_and_goes_on(gateway: GatewayService, tmp_path: Path) -> None:
    folder = tmp_path / "send"
    good = write(make_instance(modality="CT"), folder)
    (folder / "not-dicom.dcm").write_bytes(b"this is not a DICOM file")
    broken = make_instance(modality="CT")
    del broken.SOPInstanceUID  # its header reads; pynetdicom cannot send it
    unsendable = folder / "no-instance-uid.dcm"
    broken.save_as(unsendable, enforce_file_format=True)
    sent = _cli("send", "--port", str(gateway.port), "--called-ae", "PACS_TRIAGE", str(folder))
    assert sent.returncode == 1, sent.stderr
    assert "not-dicom.dcm: not sent" in sent.stderr
    assert f"{unsendable}: not sent" in sent.stderr
    assert "Traceback" not in sent.stderr
    assert "sent 1 of 3 files" in sent.stdout
    assert gateway.journal.find_instance(str(make_instance_uid(good))) is not None


def make_instance_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_second_gateway_or_up_on_a_data_dir_refuses_before_touching_the_journal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = GatewayService(gateway_settings(tmp_path))
    first.start()
    try:
        journal = first.spool.journal_path
        before = journal.stat()
        for command in ("gateway", "up"):
            config = _config(
                tmp_path,
                command,
                gateway={"port": get_port(), "host": "127.0.0.1", "data_dir": str(data)},
                http={"port": get_port()},
                dispatch={"kind": "logging"},
            )
            second = _cli(command, "--config", str(config), timeout=60)
            assert second.returncode == 2, second.stderr
            assert "in use by a running gateway" in second.stderr
            assert "gateway.recovery" not in second.stderr
        after = journal.stat()
        assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
        assert (data / LOCK_NAME).exists()
    finally:
        first.stop()


def test_up_stops_everything_and_names_the_web_service_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        config = _config(
            tmp_path,
            "up",
            gateway={"port": get_port(), "host": "127.0.0.1", "data_dir": str(tmp_path / "data")},
            http={"port": http_port, "host": "127.0.0.1"},
        )
        up = _cli("up", "--config", str(config), timeout=180)
    assert up.returncode == 1, up.stderr
    assert "the web service (serve-http) could not start or has stopped" in up.stderr
    assert "stopping everything" in up.stderr
