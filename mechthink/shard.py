"""Sharding an analysis over problems, and merging the shards into the unsharded result.

``--shard i/n`` (1-based: ``1/2`` and ``2/2`` are the two halves) runs an analysis on the
``i``-th of ``n`` contiguous blocks of its problem list (the same list an unsharded run uses) and
writes the block's per-problem records to ``<out>/<analysis>/<model>.shard-<i>-of-<n>.json``;
nothing is aggregated. :func:`merge` reads the ``n`` shard files, checks they come from one
request (same config apart from ``shard``, same mechthink version and weights) and cover every
problem exactly once, and recomputes every aggregate (means, bootstrap intervals, tables,
figure) from the records in problem order with the same code an unsharded run uses, so the
merged result equals the unsharded one.

An analysis supports sharding by setting ``SHARDABLE = True`` on its config and providing
``records(cfg, model, problems) -> list[dict | None]`` (one JSON-friendly record per problem,
None to skip it) and ``aggregate(cfg, records, model_name) -> (numbers, figure)``; its ``main``
calls :func:`run`. Analyses whose numbers couple problems (a baseline or probe fitted on all of
them) refuse ``--shard`` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechthink.config import ConfigError
from mechthink.results import jsonable

__all__ = ["Shard", "ShardError", "merge", "pack", "parse_shard", "run", "shard_path", "unpack"]

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardError(ValueError):
    """Shard files that cannot be merged into one result (the message names the files)."""


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (1-based) of ``count`` contiguous blocks of a problem list."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this block of ``n`` problems (blocks differ in size by at most 1)."""
        return (self.index - 1) * n // self.count, self.index * n // self.count


def parse_shard(spec: str) -> Shard | None:
    """``"i/n"`` → :class:`Shard` (``""`` → None, no sharding).

    Raises:
        ConfigError: anything but ``i/n`` with integers ``1 <= i <= n`` (one line, naming ``shard``).

    Examples:
        >>> [parse_shard(f"{i}/3").bounds(10) for i in (1, 2, 3)]
        [(0, 3), (3, 6), (6, 10)]
        >>> parse_shard("") is None
        True
        >>> parse_shard("0/2")
        Traceback (most recent call last):
        ...
        mechthink.config.ConfigError: shard='0/2' is not accepted; shards are numbered 1..n (1-based), so use 1/2 .. 2/2
    """
    if spec is None or str(spec).strip() == "":
        return None
    m = _SPEC.match(str(spec))
    if not m:
        raise ConfigError(f"shard={spec!r} is not accepted; use i/n with integers 1 <= i <= n, e.g. 1/4")
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= i <= n:
        raise ConfigError(f"shard={spec!r} is not accepted; shards are numbered 1..n (1-based), so use 1/{max(n, 1)} .. "
                          f"{max(n, 1)}/{max(n, 1)}")
    return Shard(i, n)


def shard_path(out: str | Path, name: str, model: str, shard: Shard) -> Path:
    """``<out>/<name>/<model>.shard-<i>-of-<n>.json``."""
    from mechthink.report import output_paths

    _, js = output_paths(out, name, model)
    return js.with_name(f"{js.stem}.shard-{shard.index}-of-{shard.count}.json")


def pack(obj: Any) -> Any:
    """``obj`` (dataclasses, dicts, lists, tensors) as JSON-friendly values that :func:`unpack`
    turns back into the same tensors bit for bit: a tensor becomes ``{"__tensor__": values,
    "dtype": ..., "shape": ...}``; a dataclass becomes the dict of its fields.

    Examples:
        >>> import json, torch
        >>> x = {"mi": torch.tensor([0.1, 2.5]), "empty": torch.zeros(0, 3, dtype=torch.int64)}
        >>> y = unpack(json.loads(json.dumps(pack(x))))
        >>> torch.equal(y["mi"], x["mi"]), y["mi"].dtype, tuple(y["empty"].shape), y["empty"].dtype
        (True, torch.float32, (0, 3), torch.int64)
    """

    def tensor(t: Any) -> Any:
        import torch

        if not isinstance(t, torch.Tensor):
            return t.tolist()
        t = t.detach().cpu()
        return {"__tensor__": t.tolist(), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}

    return jsonable(obj, tensor)


def unpack(obj: Any) -> Any:
    """The inverse of :func:`pack` (tensors rebuilt with their dtype and shape; dataclasses stay dicts)."""
    import torch

    if isinstance(obj, dict) and "__tensor__" in obj:
        return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"])).reshape(obj["shape"])
    if isinstance(obj, dict):
        return {k: unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v) for v in obj]
    return obj


Records = Callable[[Any, Any, Sequence[Any]], list[Any]]
Aggregate = Callable[[Any, list[dict[str, Any]], str], tuple[dict[str, Any], Any]]


def run(name: str, cfg: Any, model: Any, problems: Sequence[Any], records: Records, aggregate: Aggregate) -> dict[str, Any]:
    """Run an analysis over ``problems`` (or its ``cfg.shard`` block) the one way merging can repeat.

    Unsharded: records of every problem, :func:`aggregate` of them (after a JSON round trip, as
    a merge reads them), :func:`mechthink.report.write_outputs`; returns the numbers. Sharded:
    the block's records go to :func:`shard_path`; returns ``{"shard", "n_problems", "path"}``.
    """
    from mechthink import __version__
    from mechthink.report import _atomic_write, canonical_model, write_outputs

    shard = parse_shard(getattr(cfg, "shard", ""))
    start, stop = shard.bounds(len(problems)) if shard else (0, len(problems))
    recs = records(cfg, model, list(problems[start:stop]))
    if len(recs) != stop - start:
        raise RuntimeError(f"{name}: records() returned {len(recs)} records for {stop - start} problems")
    indexed = json.loads(json.dumps(jsonable([[start + k, r] for k, r in enumerate(recs) if r is not None])))
    if shard is None:
        numbers, fig = aggregate(cfg, [r for _, r in indexed], model.spec.name)
        write_outputs(cfg.out, name, cfg.model, fig, numbers, cfg, fingerprint=model.fingerprint())
        return numbers
    path = shard_path(cfg.out, name, cfg.model, shard)
    payload = {
        "analysis": name, "model": canonical_model(cfg.model), "model_name": model.spec.name,
        "model_fingerprint": model.fingerprint(), "config": jsonable(cfg), "mechthink_version": __version__,
        "shard": [shard.index, shard.count], "n_problems": len(problems), "problems": [start, stop],
        "records": indexed, "complete": True,
    }
    _atomic_write(path, json.dumps(payload).encode())
    return {"shard": str(shard), "n_problems": stop - start, "path": str(path)}


# ============================================================================ merging
def _shard_files(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.shard-*-of-*.json"))
            if not found:
                raise FileNotFoundError(f"{p} holds no shard files (*.shard-<i>-of-<n>.json); pass the --out folder of "
                                        "the sharded runs or the shard files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; pass shard files or folders that hold them")
    return sorted(set(files))


def _read(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({type(exc).__name__}); a shard that was still being written?") from None
    if not isinstance(d, dict) or not d.get("complete") or "records" not in d or "shard" not in d:
        raise ShardError(f"{path} is not a complete shard file (written by an analysis run with --shard i/n)")
    return d


def _check_group(files: list[Path], shards: list[dict[str, Any]]) -> None:
    first = shards[0]
    same = {k: first[k] for k in ("config", "model_fingerprint", "mechthink_version", "n_problems")}
    def request(k: str, v: Any) -> Any:  # shards may run on other machines, into other folders
        return {a: b for a, b in v.items() if a not in ("shard", "out")} if k == "config" else v

    for f, s in zip(files, shards):
        for k, v in same.items():
            if request(k, s[k]) != request(k, v):
                raise ShardError(f"{f} and {files[0]} differ in {k}; shards of one result must come from one request")
    count = first["shard"][1]
    have: dict[int, Path] = {}
    for f, s in zip(files, shards):
        if s["shard"][1] != count:
            raise ShardError(f"{f} is shard {s['shard'][0]}/{s['shard'][1]}, but {files[0]} is one of {count}")
        if s["shard"][0] in have:
            raise ShardError(f"{f} and {have[s['shard'][0]]} are both shard {s['shard'][0]}/{count}")
        have[s["shard"][0]] = f
    missing = sorted(set(range(1, count + 1)) - set(have))
    if missing:
        raise ShardError(f"shards {', '.join(f'{i}/{count}' for i in missing)} of {first['analysis']} on {first['model']} "
                         f"are missing (have {', '.join(map(str, sorted(have)))}); run them first")


def merge(paths: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Merge shard files (or the folders holding them) into the results of the unsharded runs.

    Files are grouped by analysis and model; each group must be one request's complete set of
    shards (``1/n`` .. ``n/n``, same config apart from ``shard`` and ``out``, same version and
    weights). Its
    records are put back in problem order and the analysis's ``aggregate`` recomputes every
    number and the figure, written by :func:`mechthink.report.write_outputs` with the config of
    the unsharded run (``shard=""``), so ``mechthink reproduce`` sees it as done.

    Args:
        paths: Shard files and/or folders (searched recursively for ``*.shard-<i>-of-<n>.json``).
        out: Output folder (default: the ``out`` the shards were run with).

    Returns:
        The JSON result path of each merged group.

    Raises:
        ShardError: missing, duplicate or mismatched shards, or a file that is not a shard.
    """
    import analyses
    from mechthink.report import write_outputs

    files = _shard_files(paths)
    groups: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]] = {}
    for f in files:
        d = _read(f)
        groups.setdefault((d["analysis"], d["model"]), []).append((f, d))
    written = []
    for (name, _), members in sorted(groups.items()):
        fs, shards = [m[0] for m in members], [m[1] for m in members]
        _check_group(fs, shards)
        module = analyses.get(name)
        fields = {f.name for f in dataclasses.fields(module.Config)}
        kwargs = {k: v for k, v in shards[0]["config"].items() if k in fields}
        kwargs["shard"] = ""
        if out is not None:
            kwargs["out"] = Path(out)
        cfg = module.Config(**kwargs)
        records = sorted((r for s in shards for r in s["records"]), key=lambda r: r[0])
        numbers, fig = module.aggregate(cfg, [r for _, r in records], shards[0]["model_name"])
        _, js = write_outputs(cfg.out, name, cfg.model, fig, numbers, cfg, fingerprint=shards[0]["model_fingerprint"])
        written.append(js)
    return written
