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


UNITS = ROOT / "deploy" / "systemd"


def unit_command(unit: str, settings: dict[str, str]) -> list[str]:
    """The unit's ExecStart with the env file's values, expanded as systemd does
    (``${VAR}`` one word, ``$VAR`` split on white space: empty, no word)."""
    line = next(
        line.split("=", 1)[1]
        for line in (UNITS / unit).read_text().splitlines()
        if line.startswith("ExecStart=")
    )
    words: list[str] = []
    for word in line.split():
        if word.startswith("$") and not word.startswith("${"):
            words += settings.get(word[1:], "").split()
        else:
            for key, value in settings.items():
                word = word.replace("${" + key + "}", value)
            words.append(word)
    return words


def test_the_systemd_units_run_device_sh_in_the_foreground_with_its_arguments(tmp_path):
    """Under systemd the script must become the Flower process (systemd supervises and
    restarts what it started, so no background session, no PID file), with the arguments
    device.sh takes. A fake flower-supernode / flower-superlink prints its PID and
    arguments; the PID is the one systemd would have started."""
    settings = dict(
        line.split("=", 1)
        for line in (UNITS / "drdfl-flwr.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("flower-supernode", "flower-superlink"):
        fake = bin_dir / name
        fake.write_text('#!/bin/bash\necho "pid $$ args $*"\n')
        fake.chmod(0o755)
    deploy_dir = tmp_path / "state"
    (deploy_dir / "certs").mkdir(parents=True)
    (deploy_dir / "certs" / "ca.crt").write_text("a CA")
    (deploy_dir / "node-key").write_text("a key")
    settings |= {"DRDFL_CHECKOUT": str(ROOT), "DEPLOY_DIR": str(deploy_dir)}
    env = {**settings, "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    env["FOREGROUND"] = "1"
    for unit, expected in (
        ("drdfl-supernode.service", ["--superlink 192.168.1.10:8000", "partition-id=0"]),
        ("drdfl-superlink.service", ["--port 8000", "--enable-supernode-auth"]),
    ):
        process = subprocess.Popen(
            unit_command(unit, settings), env=env, stdout=subprocess.PIPE, text=True
        )
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert out.startswith(f"pid {process.pid} args"), out  # exec'd in place
        assert all(text in out for text in expected), out
        assert "num-partitions=3" in out or unit == "drdfl-superlink.service"
    assert not list(deploy_dir.glob("*.pid"))
