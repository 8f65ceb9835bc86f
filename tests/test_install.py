"""Installing the project the usual ways works offline, with the GPU image's pip and with the pinned tools.

Each case makes a throwaway venv holding only the build tools (wheels fetched once into
.venv/wheels), copies the project, and installs it with ``PIP_NO_INDEX=1``. The CUDA extension is
skipped (``UBA_FUSED_NO_CUDA=1``) to keep it quick, and the venv has no torch: what is checked is
the build path pip takes and the metadata it installs. With pip 24.0, wheel installed and no
pyproject.toml, the editable install fell back to ``setup.py develop``, which setuptools >= 80 turns
into a nested, isolated pip that could neither fetch setuptools offline nor see torch online.
"""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHEELS = pathlib.Path(sys.prefix) / "wheels"
PINNED = dict(re.findall(r"^(pip|setuptools)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
# pip 24.0 takes the legacy `setup.py develop` path for a project without pyproject.toml only when
# `wheel` is installed, as it is on the GPU image: that is the combination that failed there.
TOOLSETS = {"gpu-image-pip-24.0": {"pip": "24.0", "setuptools": "80.9.0", "wheel": "0.48.0"}, "pinned": PINNED}
VERSION = ast.literal_eval(re.search(r"^__version__ = (.+)$", (ROOT / "uba_fused/__init__.py").read_text(),
                                     re.M).group(1))


def _wheel(name: str, version: str) -> pathlib.Path:
    path = WHEELS / f"{name}-{version}-py3-none-any.whl"
    if not path.exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--retries", "1", "--timeout", "15", "-d", str(WHEELS), f"{name}=={version}"],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            pytest.skip(f"could not fetch the {name} {version} wheel this test installs offline: {proc.stderr[-300:]}")
    return path


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _venv(tmp_path: pathlib.Path, tools: dict) -> pathlib.Path:
    """A venv with exactly these build tools (pip, setuptools, ...), installed offline from their wheels."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheels = [_wheel(name, version) for name, version in tools.items()]
    pip_whl = _wheel("pip", tools["pip"])
    proc = _run([py, pip_whl / "pip", "install", "--quiet", "--no-index", "--no-deps", *wheels], env=_env())
    assert proc.returncode == 0, proc.stderr
    return py


def _env(**extra) -> dict:
    # No index, no user or site pip configuration (this machine's constrains torch; CI's may differ).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UBA_FUSED_", "PYTHON"))}
    return {**env, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _project(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("uba_fused", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    return src


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "regular"])
@pytest.mark.parametrize("toolset", TOOLSETS, ids=TOOLSETS)
def test_install_offline_without_build_isolation(tmp_path, toolset, editable):
    py, src = _venv(tmp_path, TOOLSETS[toolset]), _project(tmp_path)
    cmd = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps"] + (["-e", src] if editable else [src])
    proc = _run(cmd, env=_env(UBA_FUSED_NO_CUDA="1"), cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    # No torch in this venv: read what was installed without importing the package.
    probe = ("import importlib.metadata as m, importlib.util as u, json; md = m.metadata('uba_fused'); "
             "print(json.dumps({'version': md['Version'], 'license': md['License-Expression'], "
             "'extras': md.get_all('Provides-Extra'), 'requires': md.get_all('Requires-Dist'), "
             "'summary': md['Summary'], 'origin': u.find_spec('uba_fused').origin}))")
    out = _run([py, "-c", probe], env=_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = __import__("json").loads(out.stdout)
    assert info["version"] == VERSION  # pyproject.toml reads uba_fused.__version__: one definition
    assert info["license"] == "BSD-3-Clause"
    assert info["extras"] == ["bench"]
    assert {"tqdm; extra == \"bench\"", "matplotlib; extra == \"bench\""} <= set(info["requires"])
    assert "GPU" not in info["summary"], "the summary must hold on every device"
    origin = pathlib.Path(info["origin"])
    if editable:
        assert origin == src / "uba_fused" / "__init__.py"
    else:
        assert tmp_path / "venv" in origin.parents


@pytest.mark.parametrize("isolated", [False, True], ids=["no-build-isolation", "isolated"])
def test_a_build_that_cannot_see_torch_says_what_to_run(tmp_path, isolated):
    """nvcc on PATH means the extension is built, against torch; without torch, a sentence that says what to do."""
    py, src = _venv(tmp_path, TOOLSETS["pinned"]), _project(tmp_path)
    bin_dir = tmp_path / "fake-cuda" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").write_text("#!/bin/sh\necho 'nvcc: a stand-in'\n")
    (bin_dir / "nvcc").chmod(0o755)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PIP_FIND_LINKS=str(WHEELS))
    cmd = [py, "-m", "pip", "install", "--no-deps"] + ([] if isolated else ["--no-build-isolation"]) + [src]
    proc = _run(cmd, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "torch cannot be imported here" in text and "pip install --no-build-isolation" in text, text[-3000:]
    assert "UBA_FUSED_NO_CUDA=1" in text
