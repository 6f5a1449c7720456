"""Writing analysis outputs: ``<out>/<name>/<model>.png`` and ``.json`` (numbers + provenance).

Every analysis script ends with :func:`write_outputs`; the JSON carries the numbers, the
config, the mechthink version, the git commit and ``"complete": true`` so ``mechthink
reproduce`` can skip finished work. Files are written atomically (temp file + rename), so an
interrupted run never leaves a half-written result that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mechthink.results import jsonable as _jsonable

log = logging.getLogger(__name__)

__all__ = ["canonical_model", "is_complete", "model_slug", "output_paths", "problem_traces", "trace_store", "write_outputs", "git_commit"]


def canonical_model(model: str) -> str:
    """The registry's canonical name for a name or alias (``smollm2`` → ``smollm2-135m``), else
    the name as given: outputs are named after it, so an alias finds the same files."""
    from mechthink.models.registry import resolve_name

    return resolve_name(str(model)) or str(model)


def model_slug(model: str) -> str:
    """A file-name-safe label of the canonical model name (``org/name`` → ``org__name``; every
    character outside letters, digits, ``. _ -`` becomes ``_``)."""
    name = canonical_model(model).replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "model"


def output_paths(out: str | Path, name: str, model: str) -> tuple[Path, Path]:
    """The PNG and JSON paths of one analysis on one model: the one place that names them,
    used by :func:`write_outputs` and by :func:`is_complete` (resume)."""
    folder = Path(out) / name
    slug = model_slug(model)
    return folder / f"{slug}.png", folder / f"{slug}.json"


def trace_store(out: str | Path, name: str, model: str, **request: Any) -> Path:
    """The JSONL trace store of one analysis on one model for one generation request
    (``<out>/<name>/<model>.traces-<hash of request>.jsonl``): a killed analysis resumes from
    it, and a changed request (budget, sampling, problems' seed) gets a store of its own."""
    import hashlib

    key = hashlib.sha1(json.dumps(_jsonable(request), sort_keys=True).encode()).hexdigest()[:10]
    png, _ = output_paths(out, name, model)
    return png.with_name(f"{png.stem}.traces-{key}.jsonl")


def problem_traces(model: Any, problems: Any, cfg: Any, name: str, batch_size: int = 8) -> list[Any]:
    """One greedy trace per problem for an analysis: imported from ``cfg.traces`` when set, else
    generated; either way through a :func:`trace_store` keyed on the request (for imports: the
    file's path and content hash, so a changed file is never answered from an old store)."""
    from mechthink import traces

    if getattr(cfg, "traces", ""):
        store = trace_store(cfg.out, name, cfg.model, imported=traces.source_key(cfg.traces))
        got = traces.import_traces(model, cfg.traces, questions=problems, store=store)
        sampled = sorted({str(t.config["imported"]["sampling"].get("temperature")) for t in got} - {"0", "0.0", "None"})
        if sampled:
            log.warning("%s: %s analyses greedy traces, but %s records temperature %s; its numbers are those of "
                        "the imported sampling", cfg.traces, name, cfg.traces, ", ".join(sampled))
        return got
    store = trace_store(cfg.out, name, cfg.model, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, gsm8k=cfg.gsm8k_path)
    return traces.generate(model, problems, max_new_tokens=cfg.max_new_tokens, batch_size=batch_size, store=store,
                           progress=True)


def _requested(config: Any) -> dict[str, Any]:
    """What a result depends on: the config without where it is written."""
    cfg = _jsonable(config)
    if isinstance(cfg, dict):
        # out: where, not what; shard/traces at '' (their defaults) equal results from before they existed
        cfg = {k: v for k, v in cfg.items() if k != "out" and not (k in ("shard", "traces") and v == "")}
        if "model" in cfg:
            cfg["model"] = canonical_model(cfg["model"])
    return cfg


def is_complete(out: str | Path, name: str, config: Any, fingerprint: str | None = None) -> bool:
    """Whether ``<out>/<name>/<model>.json`` holds a finished result for exactly this request:
    complete, the same config (apart from ``out``; aliases of a model count as the model), the
    same mechthink version, and — when ``fingerprint`` is given — the same model weights."""
    from mechthink import __version__

    model = config.get("model", "") if isinstance(config, dict) else getattr(config, "model", "")
    _, js = output_paths(out, name, model)
    try:
        meta = json.loads(js.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not (meta.get("complete") and meta.get("mechthink_version") == __version__):
        return False
    if _requested(meta.get("config")) != _requested(config):
        return False
    return fingerprint is None or meta.get("model_fingerprint") == fingerprint


def git_commit() -> str | None:
    """The current git commit of the mechthink checkout, if it is one."""
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename (never half-written), with
    the permissions a plain ``open()`` would give (``mkstemp`` makes files 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_outputs(
    out: str | Path,
    name: str,
    model: str,
    figure: Any | None,
    numbers: dict[str, Any],
    config: Any,
    dpi: int = 130,
    fingerprint: str | None = None,
) -> tuple[Path, Path]:
    """Write the figure (PNG, and SVG beside it) and the JSON (numbers, config, version, commit,
    the model's canonical name and weights fingerprint, complete=True)."""
    from mechthink import __version__

    png, js = output_paths(out, name, model)
    if figure is not None:
        import io

        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=dpi)
        _atomic_write(png, buf.getvalue())
        vec = io.BytesIO()  # the same figure as SVG, for papers
        figure.savefig(vec, format="svg")
        _atomic_write(png.with_suffix(".svg"), vec.getvalue())
    payload = {
        "analysis": name,
        "model": canonical_model(model),
        "model_fingerprint": fingerprint,
        "numbers": _jsonable(numbers),
        "config": _jsonable(config),
        "mechthink_version": __version__,
        "git_commit": git_commit(),
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    _atomic_write(js, json.dumps(payload, indent=1).encode())
    return png, js


def build_index(out: str | Path, descriptions: dict[str, str] | None = None) -> Path:
    """Write ``<out>/index.html``: every figure with one line on what it shows, fully offline.

    Images are referenced by relative paths (no network); circuitsvis views (``*.html`` next to
    a figure) are linked. An inline script marks each ``<img>`` with ``data-loaded`` once it has
    rendered, so a headless browser check can confirm every image is present.
    """
    import html as _html

    out = Path(out)
    descriptions = descriptions or {}
    sections = []
    def href(*parts: str) -> str:  # a relative URL, percent-encoded, safe inside an attribute
        return _html.escape("/".join(quote(p) for p in parts), quote=True)

    def text(value: object) -> str:
        return _html.escape(str(value), quote=True)

    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        items = []
        for js in sorted(folder.glob("*.json")):
            try:
                meta = json.loads(js.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(meta, dict):
                continue
            png = js.with_suffix(".png")
            view = js.with_suffix(".html")
            model = text(meta.get("model", js.stem))
            links = [f'<a href="{href(folder.name, js.name)}">numbers (JSON)</a>']
            if view.exists():
                links.append(f'<a href="{href(folder.name, view.name)}">interactive token view</a>')
            img = (
                f'<img src="{href(folder.name, png.name)}" alt="{text(folder.name)} on {model}" loading="eager">'
                if png.exists()
                else ""
            )
            items.append(
                f"<div class='fig'><h3>{model}</h3>{img}<p>{' · '.join(links)} · commit "
                f"{text(str(meta.get('git_commit') or '?')[:10])}</p></div>"
            )
        if items:
            desc = text(descriptions.get(folder.name, ""))
            sections.append(f"<section id=\"{href(folder.name)}\"><h2>{text(folder.name)}</h2><p>{desc}</p>{''.join(items)}</section>")
    toc = "".join(f"<li><a href=\"#{href(p.name)}\">{text(p.name)}</a>: {text(descriptions.get(p.name, ''))}</li>"
                  for p in sorted(out.iterdir()) if p.is_dir())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mechthink figures</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}} img{{max-width:100%;border:1px solid #ddd}}
.fig{{margin-bottom:2em}} h2{{border-bottom:1px solid #aaa}}</style></head>
<body><h1>mechthink: reproduced figures</h1><ul>{toc}</ul>{''.join(sections)}
<script>
function mark(img){{ if (img.complete && img.naturalWidth > 0) img.setAttribute('data-loaded','1'); }}
document.querySelectorAll('img').forEach(function(img){{ mark(img); img.addEventListener('load', function(){{ mark(img); }}); }});
</script></body></html>
"""
    path = out / "index.html"
    _atomic_write(path, page.encode())
    return path
