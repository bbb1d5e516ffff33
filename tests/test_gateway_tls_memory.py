"""Mutual TLS on the SCP, and bounded memory when a very large object arrives."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import Verification

from gateway.service import GatewayService
from gateway.settings import TLSSettings
from tests.conftest import gateway_settings
from tests.test_gateway_crash import _start_gateway, _wait_listening
from tests.utils import get_port, make_instance


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server and a client certificate it signed, and a rogue self-signed client."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(d / f"{name}.crt"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rogue",
             "-keyout", str(d / "rogue.key"), "-out", str(d / "rogue.crt"))
    return d


def _client_context(pki: Path, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    context.check_hostname = False
    if cert:
        context.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return context


@pytest.mark.parametrize(("client_cert", "accepted"), [("client", True), ("rogue", False), (None, False)])
def test_mutual_tls_accepts_only_certificates_from_the_ca(tmp_path: Path, pki: Path, client_cert: str | None,
                                                         accepted: bool) -> None:
    tls = TLSSettings(enabled=True, certificate=pki / "server.crt", private_key=pki / "server.key",
                      ca_certificates=pki / "ca.crt", require_client_certificate=True)
    service = GatewayService(gateway_settings(tmp_path, tls=tls))
    service.start()
    try:
        ae = AE(ae_title="TLS_SCU")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", service.port, ae_title="PACS_TRIAGE",
                             tls_args=(_client_context(pki, client_cert), None))
        assert assoc.is_established is accepted
        if accepted:
            assert assoc.send_c_echo().Status == 0
            assoc.release()
    finally:
        service.stop()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_memory_does_not_grow_with_object_size(tmp_path: Path) -> None:
    """A 400 MB object passes through a gateway whose peak memory grows far less than that."""
    big = make_instance(modality="MG", rows=8, cols=8)
    big.Rows, big.Columns = 14000, 14000
    big.PixelData = np.zeros((14000, 14000), dtype=np.uint16).tobytes()
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    del big
    port = get_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"port": port, "host": "127.0.0.1",
                                                  "data_dir": str(tmp_path / "data")}}))
    proc = _start_gateway(config)
    try:
        _wait_listening(port, proc)
        small = make_instance(modality="MG")
        ae = AE(ae_title="MODALITY")
        ae.requested_contexts = [build_context(small.SOPClassUID, [small.file_meta.TransferSyntaxUID])]
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
        assert assoc.send_c_store(small).Status == 0
        baseline = _peak_rss_mib(proc.pid)
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assert assoc.send_c_store(path).Status == 0
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
        growth = _peak_rss_mib(proc.pid) - baseline
        size_mib = path.stat().st_size / 2**20
        assert growth < 0.15 * size_mib, f"peak RSS grew {growth:.0f} MiB for a {size_mib:.0f} MiB object"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert sys.platform.startswith("linux")
