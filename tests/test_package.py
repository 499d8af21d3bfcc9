"""The package as users get it: build the wheel, install it into a fresh virtual environment
that holds only the core dependencies, import pixreg there and run one loss.

"Only the core dependencies" is made quick and honest without downloading or unpacking torch
again: the fresh venv (no system site-packages) sees a folder of links to exactly the
distributions that ``pixreg``'s declared core requirements (torch, numpy) need, closed over
their own requirements as recorded in their metadata, and nothing else; pip resolves the
wheel's requirements against them (``--no-index``: nothing can be fetched), ``pip check``
confirms the environment is consistent, and the test asserts that the optional packages
(yaml, scipy, PIL, albumentations, ...) cannot be imported there.
``PIXREG_WHEEL_TEST_FULL=1`` installs torch and numpy for real instead (slow: minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["yaml", "scipy", "PIL", "albumentations", "torchmetrics", "tqdm", "matplotlib", "sklearn",
            "transformers", "lightning", "mlxtend", "skimage"]


def _requirement_names(dist_name: str) -> list[str]:
    from packaging.requirements import Requirement

    names = []
    for text in metadata.requires(dist_name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def core_closure(roots: list[str]) -> list[metadata.Distribution]:
    """The installed distributions needed by ``roots``, following their recorded requirements."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        todo += _requirement_names(name)
    return list(seen.values())


def link_distributions(dists: list[metadata.Distribution], target: Path) -> None:
    """Symlink the top-level files/folders of each distribution (code and .dist-info) into target."""
    target.mkdir()
    for dist in dists:
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not Path(f).parts[0].startswith("..")}
        for top in tops:
            src, dst = base / top, target / top
            if src.exists() and not dst.exists() and top != "__pycache__":
                dst.symlink_to(src)


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT / "pixreg", src / "pixreg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("pixreg-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_contents(wheel):
    import pixreg

    assert wheel.name == f"pixreg-{pixreg.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("pixreg/py.typed", "pixreg/configs/camvid.yaml", "pixreg/configs/scenes.yaml",
                     f"pixreg-{pixreg.__version__}.dist-info/licenses/LICENSE"):
        assert required in names, required
    meta = zipfile.ZipFile(wheel).read(f"pixreg-{pixreg.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in meta
    requires = sorted(line.split(":", 1)[1].strip() for line in meta.splitlines()
                      if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert requires == ["numpy>=1.23", "torch>=2.1"]  # the core is torch + numpy only
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


SCRIPT = textwrap.dedent("""
    import importlib.util, json, os, sys
    import torch, pixreg
    from pixreg.train.config import find_config
    missing = [m for m in {optional!r} if importlib.util.find_spec(m) is None]
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = torch.randint(0, 3, (2, 6, 6))
    loss = pixreg.CARLoss(3)(x, y)
    loss.backward()
    print(json.dumps({{"version": pixreg.__version__, "file": pixreg.__file__, "missing": missing,
                      "loss": float(loss), "grad_finite": bool(torch.isfinite(x.grad).all()),
                      "config": find_config("camvid"), "sys_prefix": sys.prefix}}))
""")


def test_wheel_installs_and_runs_with_only_core_dependencies(wheel, tmp_path):
    import json

    import pixreg

    venv = tmp_path / "venv"
    # no system site-packages, and no pip/setuptools of its own: pip runs from outside (--python)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if os.environ.get("PIXREG_WHEEL_TEST_FULL"):  # real install of torch + numpy (pip's own sources)
        env = base_env
        subprocess.run(pip + ["install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)], check=True, env=env)
    else:  # nothing may be fetched: no index, no find-links, no config files
        env = {k: v for k, v in base_env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
        core = tmp_path / "core"
        link_distributions(core_closure(["torch", "numpy"]), core)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True, env=env).stdout.strip()
        Path(site, "core_deps.pth").write_text(str(core) + "\n")
        subprocess.run(pip + ["install", "-q", "--no-index", str(wheel)], check=True, env=env)
    check = subprocess.run(pip + ["check"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([str(py), "-c", SCRIPT.format(optional=OPTIONAL)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["version"] == pixreg.__version__
    assert out["file"].startswith(str(venv)), out["file"]  # the installed copy, not the checkout
    assert sorted(out["missing"]) == sorted(OPTIONAL), "optional packages leaked into the core venv"
    assert out["grad_finite"] and out["loss"] == out["loss"]  # finite, not NaN
    assert out["config"].startswith(str(venv)) and out["config"].endswith("camvid.yaml")
    # the console script is installed; without the train extra it says what to install
    cli = subprocess.run([str(venv / "bin" / "pixreg"), "train", "--config", "camvid", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert cli.returncode == 2 and "pip install pyyaml" in cli.stderr, cli.stderr


def test_licence_citation_and_changelog_agree_with_the_package():
    yaml = pytest.importorskip("yaml")
    import pixreg

    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    assert str(cff["version"]) == pixreg.__version__
    titles = [r["title"] for r in cff["references"]]
    assert len(titles) == 4 and all(t and r.get("year") for t, r in zip(titles, cff["references"]))
    readme = " ".join((ROOT / "README.md").read_text().split())  # unwrapped
    assert "## References" in readme and all(t in readme for t in titles)
    assert f"## {pixreg.__version__} " in (ROOT / "CHANGELOG.md").read_text()
