"""The built wheel works outside the checkout: analyses are importable and reproduce finds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without dependencies) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("mechthink-*.whl"))
    site = tmp / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return wheel, site


def _run(site: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    # the installed copy comes first on the path, ahead of the checkout's editable install
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "MECHTHINK_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_analyses_and_the_organism(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "analyses/__init__.py" in names and "analyses/attribution.py" in names
    assert "mechthink/models/organism/weights/model.safetensors" in names


@pytest.mark.slow
def test_analysis_runs_from_outside_the_checkout(installed, tmp_path):
    _, site = installed
    code = (
        "import mechthink, analyses\n"
        "from analyses import mi_peaks\n"
        f"assert mechthink.__file__.startswith({str(site)!r}), mechthink.__file__\n"
        f"assert analyses.__file__.startswith({str(site)!r}), analyses.__file__\n"
        "model = mechthink.load_model('tiny-thinker')\n"
        "numbers = mi_peaks.main(mi_peaks.Config(n_samples=2, out='results'), loaded_model=model)\n"
        "print(numbers['n_traces'])\n"
        "from mechthink.cli import app\n"
        "app(['reproduce', '--only', 'mi_peaks', '--n-samples', '2', '--out', 'results'], standalone_mode=False)\n"
    )
    done = _run(site, tmp_path, code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "2"
    meta = json.loads((tmp_path / "results" / "mi_peaks" / "tiny-thinker.json").read_text())
    assert meta["complete"] and meta["numbers"]["n_traces"] == 2
    assert "skip mi_peaks" in done.stdout  # reproduce found the analysis through the registry and reused it
    assert (tmp_path / "results" / "index.html").exists()
