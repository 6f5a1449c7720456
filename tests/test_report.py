"""Analysis outputs and the offline figures report (figures/index.html)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mechthink.plotting.lens import new_figure
from mechthink.report import build_index, write_outputs

REPO = Path(__file__).resolve().parents[1]


def _render(path: Path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium): headless render check skipped")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",  # network off
             f"--user-data-dir={profile}", "--virtual-time-budget=4000", "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=90,
        ).stdout


def test_write_outputs_and_index(tmp_path):
    fig = new_figure(3, 2)
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    png, js = write_outputs(tmp_path, "demo", "org/model", fig, {"x": 1.5}, {"n": 3})
    assert png.name == "org__model.png" and png.stat().st_size > 1000
    assert png.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == (0o666 & ~mask) for p in (png, js))  # not mkstemp's 0600
    meta = json.loads(js.read_text())
    assert meta["complete"] is True and meta["numbers"] == {"x": 1.5} and meta["model"] == "org/model"
    assert "git_commit" in meta and "mechthink_version" in meta
    index = build_index(tmp_path, {"demo": "a demo figure"})
    page = index.read_text()
    assert "a demo figure" in page and 'src="demo/org__model.png"' in page
    assert not re.search(r"(src|href)\s*=\s*[\"']https?:", page)
    dom = _render(index)
    assert dom.count("<img") == 1 and dom.count('data-loaded="1"') == 1


def test_committed_report_renders_every_image_offline():
    index = REPO / "figures" / "index.html"
    assert index.exists(), "figures/index.html is written by `mechthink reproduce`"
    page = index.read_text()
    n_img = page.count("<img")
    assert n_img >= 6
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (index.parent / src).exists(), src
    dom = _render(index)
    assert dom.count('data-loaded="1"') == n_img


HOSTILE = [
    'm"><img src=x onerror="document.title=\'PWNED\'">',
    "m'><script>document.title='PWNED'</script>",
    "</script><script>document.title='PWNED'</script>",
    "m\tsrc=x\tonerror=\"document.title='PWNED'\"",
]


def test_index_escapes_hostile_names(tmp_path):
    """Names from the command line and from folders end up as text, never as markup or script."""
    from mechthink.report import is_complete, model_slug

    fig = new_figure(2, 2)
    fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
    for i, name in enumerate(HOSTILE):
        png, js = write_outputs(tmp_path, "demo", name, fig, {"i": i}, {"model": name, "n": i})
        assert png.parent == tmp_path / "demo" and set(png.stem) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        assert is_complete(tmp_path, "demo", {"model": name, "n": i}) and not is_complete(tmp_path, "demo", {"model": name, "n": i + 1})
        assert model_slug(name) == png.stem
    hostile_dir = tmp_path / HOSTILE[0].replace("/", "_")
    hostile_dir.mkdir()
    (hostile_dir / "x.json").write_text(json.dumps({"model": HOSTILE[2], "git_commit": HOSTILE[1]}))
    index = build_index(tmp_path, {"demo": HOSTILE[1], hostile_dir.name: HOSTILE[2]})
    page = index.read_text()
    assert "<script>document" not in page and "onerror=" not in page.replace("onerror=&quot;", "")
    dom = _render(index)
    assert "PWNED" not in dom.split("<title>")[1].split("</title>")[0]
    assert dom.count("<img") == len(HOSTILE)  # the figures, and no injected image


def test_aliases_name_the_same_files_and_resume_finds_them(tmp_path):
    from mechthink.report import is_complete, output_paths

    assert output_paths(tmp_path, "x", "smollm2") == output_paths(tmp_path, "x", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert output_paths(tmp_path, "x", "smollm2")[1].name == "smollm2-135m.json"
    write_outputs(tmp_path, "x", "smollm2", None, {"a": 1}, {"model": "smollm2", "n_samples": 3, "out": "elsewhere"},
                  fingerprint="abc")
    assert is_complete(tmp_path, "x", {"model": "smollm2-135m", "n_samples": 3, "out": str(tmp_path)}, "abc")
    assert not is_complete(tmp_path, "x", {"model": "smollm2-135m", "n_samples": 4}, "abc")  # options changed
    assert not is_complete(tmp_path, "x", {"model": "smollm2-135m", "n_samples": 3}, "other-weights")
    assert not is_complete(tmp_path, "x", {"model": "tiny-thinker", "n_samples": 3})
