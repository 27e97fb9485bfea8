"""deploy/device.sh certs, run twice, keeps the CA every enrolled device trusts (before:
the second run silently replaced it and locked every device out); --replace-ca moves the
old one aside first."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "deploy" / "device.sh"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def certs(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DEVICE), "certs", *args],
        env={"PATH": "/usr/bin:/bin", "DEPLOY_DIR": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def san(cert: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_certs_twice_keeps_the_ca_and_reissues_the_superlink_certificate(tmp_path):
    assert certs(tmp_path, "192.168.1.10").returncode == 0
    ca = (tmp_path / "certs" / "ca.crt").read_bytes()
    second = certs(tmp_path, "192.168.1.10", "superlink.lan")
    assert second.returncode == 0 and "kept the existing CA" in second.stdout
    assert (tmp_path / "certs" / "ca.crt").read_bytes() == ca
    assert "DNS:superlink.lan" in san(tmp_path / "certs" / "superlink.pem")
    verified = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "certs" / "ca.crt"),
            str(tmp_path / "certs" / "superlink.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_replace_ca_moves_the_old_one_aside(tmp_path):
    assert certs(tmp_path, "10.0.0.1").returncode == 0
    old = (tmp_path / "certs" / "ca.crt").read_bytes()
    replaced = certs(tmp_path, "--replace-ca", "10.0.0.1")
    assert replaced.returncode == 0 and "moved the old CA" in replaced.stdout
    (aside,) = tmp_path.glob("certs.*")
    assert (aside / "ca.crt").read_bytes() == old
    assert (tmp_path / "certs" / "ca.crt").read_bytes() != old


def test_a_device_copy_of_the_ca_cannot_sign_and_says_so(tmp_path):
    (tmp_path / "certs").mkdir()
    assert certs(tmp_path, "10.0.0.1").returncode == 0
    (tmp_path / "certs" / "ca.key").unlink()
    refused = certs(tmp_path, "10.0.0.1")
    assert refused.returncode == 1 and "has no ca.key beside it" in refused.stderr
