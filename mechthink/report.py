"""Writing analysis outputs: ``<out>/<name>/<model>.png`` and ``.json`` (numbers + provenance).

Every analysis script ends with :func:`write_outputs`; the JSON carries the numbers, the
config, the mechthink version, the git commit and ``"complete": true`` so ``mechthink
reproduce`` can skip finished work. Files are written atomically (temp file + rename), so an
interrupted run never leaves a half-written result that looks complete.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["model_slug", "output_paths", "write_outputs", "git_commit"]


def model_slug(model: str) -> str:
    """A file-name-safe model label (``org/name`` → ``org__name``)."""
    return str(model).replace("/", "__").replace(" ", "_")


def output_paths(out: str | Path, name: str, model: str) -> tuple[Path, Path]:
    """The PNG and JSON paths of one analysis on one model."""
    folder = Path(out) / name
    slug = model_slug(model)
    return folder / f"{slug}.png", folder / f"{slug}.json"


def git_commit() -> str | None:
    """The current git commit of the mechthink checkout, if it is one."""
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_outputs(
    out: str | Path, name: str, model: str, figure: Any | None, numbers: dict[str, Any], config: Any, dpi: int = 130
) -> tuple[Path, Path]:
    """Write the figure (PNG) and the JSON (numbers, config, version, commit, complete=True)."""
    from mechthink import __version__

    png, js = output_paths(out, name, model)
    if figure is not None:
        import io

        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=dpi)
        _atomic_write(png, buf.getvalue())
    payload = {
        "analysis": name,
        "model": model,
        "numbers": _jsonable(numbers),
        "config": _jsonable(config),
        "mechthink_version": __version__,
        "git_commit": git_commit(),
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    _atomic_write(js, json.dumps(payload, indent=1).encode())
    return png, js
