"""Encryption on the command line: the options reach the configs, mistakes are usage errors (exit
code 2, one line) found before anything starts, the JSON report says what ran, and every refusal
ends both commands with exit code 1 and one error line, within their timeout."""

from __future__ import annotations

import json
import mmap
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tls_helpers import Pki, make_pki
from tls_relay import Attack, TlsRelay

from livemig import cli, migration, wire

from cli_helpers import LIVEMIG, run

SECRET = "cli-tls-secret-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def secrets(tmp_path: Path) -> tuple[str, str, str]:
    """Two different secrets of 25 bytes and one too short to key TLS."""
    paths = []
    for name, text in (("a", SECRET), ("b", SECRET[::-1]), ("short", "hunter2")):
        p = tmp_path / name
        p.write_text(text + "\n")
        paths.append(str(p))
    return paths[0], paths[1], paths[2]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def _lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ln.strip()]


def _error(stderr: str, warnings: int = 0) -> str:
    """The one error line, after ``warnings`` warning lines and nothing else."""
    lines = _lines(stderr)
    assert len(lines) == warnings + 1, stderr
    assert all(ln.startswith("livemig: warning: ") for ln in lines[:warnings]), stderr
    assert lines[-1].startswith("livemig: error: "), stderr
    return lines[-1]


# ---- in process: options and usage errors ----


@dataclass
class Recorder:
    configs: list[Any]

    def migrate(self, address: str, workload: Any, config: migration.MigrationConfig, *rest: Any, **kw: Any) -> Any:
        self.configs.append(config)
        return migration.MigrationResult(ok=True, mode="precopy", region_bytes=workload.region.nbytes,
                                         page_size=mmap.PAGESIZE)

    def serve(self, listener: Any, config: migration.DestinationConfig, *rest: Any, **kw: Any) -> Any:
        self.configs.append(config)
        return migration.DestinationSummary(ok=True, mode="precopy", region_bytes=1 << 20)


def test_options_reach_the_configs(monkeypatch: pytest.MonkeyPatch, pki: Pki, secrets: tuple[str, str, str],
                                   tmp_path: Path) -> None:
    rec = Recorder([])
    monkeypatch.setattr(migration, "migrate", rec.migrate)
    monkeypatch.setattr(migration, "serve", rec.serve)
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    r = invoke("migrate", "--to", "10.9.8.7:7000", "--size", "8M", "--quiet", "--no-progress",
               "--tls-cert", pki.file("client-cert.pem"), "--tls-key", pki.file("client-key.pem"),
               "--tls-ca", pki.file("ca-cert.pem"), "--tls-peer-name", "dest.example")
    assert r.exit_code == 0, r.output
    r = invoke("migrate", "--to", "127.0.0.1:7000", "--size", "8M", "--quiet", "--no-progress", "--encrypt",
               "--secret-file", secrets[0])
    assert r.exit_code == 0, r.output
    r = invoke("listen", f"unix:{tmp_path / 'sock'}", "--once", "--quiet", "--encrypt", "--tls-dir", str(pki.dir),
               "--tls-peer-name", "client.livemig.test")
    assert r.exit_code == 0, r.output
    x509, psk, dest = rec.configs
    assert x509.encrypt is None and x509.tls == wire.TlsSettings(
        cert=pki.file("client-cert.pem"), key=pki.file("client-key.pem"), ca=pki.file("ca-cert.pem"),
        peer_name="dest.example")
    assert psk.encrypt is True and psk.secret == SECRET.encode() and not psk.tls.x509
    assert dest.encrypt is True and dest.tls == wire.TlsSettings(directory=str(pki.dir),
                                                                 peer_name="client.livemig.test")


@pytest.mark.parametrize(("args", "message"), [
    (["migrate", "--to", "10.9.8.7:7000"], ("encryption is on by default toward 10.9.8.7:7000, beyond loopback,"
     " and there are no keys")),
    (["migrate", "--encrypt"], "encryption needs keys"),
    (["migrate", "--encrypt", "--secret-file", "SHORT"], "at least 16 bytes"),
    (["migrate", "--to", "10.9.8.7:7000", "--secret-file", "SHORT"], "must hold at least 16 bytes"),
    (["migrate", "--tls-cert", "CERT"], "key, ca missing"),
    (["migrate", "--tls-dir", "NOWHERE"], "no TLS directory"),
    (["migrate", "--tls-cert", "CERT", "--tls-key", "SKEY", "--tls-ca", "CA"], "key values mismatch"),
    (["listen", "0.0.0.0:0"], "beyond loopback without a shared secret or certificates"),
    (["listen", "127.0.0.1:0", "--encrypt"], "encryption needs keys"),
    (["listen", "0.0.0.0:0", "--secret-file", "SHORT"], "must hold at least 16 bytes"),
])
def test_mistakes_are_usage_errors(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, pki: Pki,
                                   secrets: tuple[str, str, str], tmp_path: Path) -> None:
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    subst = {"SHORT": secrets[2], "CERT": pki.file("client-cert.pem"), "CA": pki.file("ca-cert.pem"),
             "SKEY": pki.file("server-key.pem"),
             "NOWHERE": str(tmp_path / "nowhere")}
    r = invoke(*[subst.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    line = _error(r.stderr)
    assert message in line, line


# ---- real processes ----


def _listen(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*LIVEMIG, "listen", "127.0.0.1:0", "--once", "--announce", "--quiet", "--no-progress",
                             "--timeout", "5", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), (line, proc.stderr.read() if proc.stderr else "")
    return proc, line.removeprefix("listening on ").strip()


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.timeout(120)
def test_an_encrypted_migration_reports_what_ran(secrets: tuple[str, str, str]) -> None:
    r = run("migrate", "--size", "16M", "--json", "--quiet", "--no-progress", "--verify", "--encrypt",
            "--secret-file", secrets[0], timeout=90)
    assert r.returncode == 0, r.stderr
    tls = json.loads(r.stdout)["tls"]
    assert tls["enabled"] and tls["keying"] == "psk" and tls["cipher"] == "TLS_AES_128_GCM_SHA256", tls
    assert tls["record_path"] == "userspace" and tls["ktls"] is False and "tls ULP" in tls["ktls_unavailable"], tls
    assert tls["peer"] == "psk:livemig-v1" and tls["channels"] == 2 and tls["handshake_ms"] > 0, tls


@pytest.mark.timeout(120)
def test_certificates_from_a_directory_key_the_session(pki: Pki) -> None:
    """--tls-dir alone: both sides hold only certificates, so TLS is required (loopback too); the
    source checks that the embedded destination's certificate names 127.0.0.1."""
    r = run("migrate", "--size", "16M", "--json", "--quiet", "--no-progress", "--verify", "--tls-dir",
            str(pki.dir), timeout=90)
    assert r.returncode == 0, r.stderr
    tls = json.loads(r.stdout)["tls"]
    assert tls["enabled"] and tls["keying"] == "x509" and "CN=localhost" in tls["peer"], tls


REFUSALS = {
    "plaintext source": (["--encrypt", "--secret-file", "A"], ["--no-encrypt"], 1,
                         "the destination requires encryption (TLS 1.3) and the source declines it (--no-encrypt)",
                         "the source declines it"),
    "wrong secret": (["--encrypt", "--secret-file", "A"], ["--encrypt", "--secret-file", "B"], 0,
                     "refused our key", "PSK binder does not verify"),
    "certificate from another CA": (["--tls-dir", "PKI"], ["--tls-cert", "rogue-cert.pem", "--tls-key",
                                    "rogue-key.pem", "--tls-ca", "ca-cert.pem"], 0,
                                    "refused our certificate", "unable to get local issuer certificate"),
    "expired certificate": (["--tls-cert", "expired-cert.pem", "--tls-key", "expired-key.pem", "--tls-ca",
                             "ca-cert.pem"], ["--tls-dir", "PKI", "--tls-peer-name", "localhost"], 0,
                            "certificate has expired", "refused our certificate"),
    "wrong peer name": (["--tls-dir", "PKI"], ["--tls-dir", "PKI", "--tls-peer-name", "dest.example"], 0,
                        "does not name 'dest.example'", "refused our certificate"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_end_both_commands_with_one_line(case: str, pki: Pki, secrets: tuple[str, str, str]) -> None:
    listen_args, migrate_args, warnings, src_says, dst_says = REFUSALS[case]
    subst = {"A": secrets[0], "B": secrets[1], "PKI": str(pki.dir)}

    def fill(args: list[str]) -> list[str]:
        return [subst.get(a, pki.file(a) if a.endswith(".pem") else a) for a in args]

    proc, address = _listen(*fill(listen_args))
    t0 = time.monotonic()
    r = run("migrate", "--to", address, "--size", "16M", "--quiet", "--no-progress", "--timeout", "5",
            *fill(migrate_args), timeout=60)
    took = time.monotonic() - t0
    code, err = _finish(proc)
    assert r.returncode == 1 and src_says in _error(r.stderr, warnings), r.stderr
    assert code == 1 and dst_says in _error(err), err
    assert took < 15


@pytest.mark.timeout(120)
def test_a_peer_that_stops_mid_handshake_ends_both_within_the_timeout(secrets: tuple[str, str, str]) -> None:
    proc, address = _listen("--encrypt", "--secret-file", secrets[0])
    attack = Attack(stall=("to_source", 0))  # the destination's first TLS record never arrives
    with TlsRelay(address, attack) as relay:
        t0 = time.monotonic()
        r = run("migrate", "--to", relay.address, "--size", "16M", "--quiet", "--no-progress", "--timeout", "2",
                "--secret-file", secrets[0], timeout=60)
        took = time.monotonic() - t0
        code, err = _finish(proc)
    assert attack.stalled.is_set()
    assert r.returncode == 1 and "TLS handshake" in _error(r.stderr), r.stderr
    assert code == 1 and "TLS handshake" in _error(err), err
    assert took < 15
