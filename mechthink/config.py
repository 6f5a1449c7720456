"""Config dataclasses: per-field docstrings, the fields every analysis shares, validation.

A config is a dataclass whose fields carry a docstring each (a string literal right below the
field, as in tuned-lens and simple-parsing). :func:`field_docs` reads them from the source, so
the one CLI generator (:func:`mechthink.cli.command_from_config`) turns them into ``--help``
text. :class:`AnalysisConfig` holds the fields every analysis has; analyses subclass it and
redeclare a field to change its default.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["AnalysisConfig", "ConfigError", "DEFAULT_OUT", "ProblemConfig", "TraceConfig", "config_dict", "field_docs", "require"]

#: Where analyses write unless told otherwise: a fresh folder in the working directory, never
#: the checkout's committed ``figures/`` (``mechthink reproduce --figures`` refreshes those).
DEFAULT_OUT = Path("mechthink-out")


class ConfigError(ValueError):
    """A config value outside what is accepted (the message names the field)."""


def require(ok: bool, field: str, value: Any, accepted: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``field`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field}={value!r} is not accepted; {accepted}")


@functools.cache
def _docs_of_class(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    out: dict[str, str] = {}
    if not isinstance(body, ast.ClassDef):
        return out
    stmts = body.body
    for stmt, nxt in zip(stmts, stmts[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                out[stmt.target.id] = " ".join(nxt.value.value.split())
    return out


def _attributes_section(doc: str | None) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section."""
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    current = None
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break
        m = re.match(r"^\s{4}(\w+)(?: \(.*?\))?:\s*(.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for a dataclass, base classes included (a subclass's doc wins).

    A field's doc is the string literal right below it, else its entry in the class
    docstring's ``Attributes:`` section.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_attributes_section(klass.__doc__))
            docs.update(_docs_of_class(klass))
    return docs


def config_dict(cfg: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config as a JSON-friendly dict (paths as strings), without ``exclude``."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in exclude:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else v
    return out


@dataclass
class AnalysisConfig:
    """The fields every analysis has."""

    model: str = "tiny-thinker"
    """Registry name or alias, hub id, local HF directory or .gguf file of the model."""
    out: Path = DEFAULT_OUT
    """Output folder: <out>/<analysis>/<model>.png and .json."""
    n_samples: int = 100
    """Number of problems (or examples) the analysis runs on."""
    seed: int = 0
    """Seed of the problem sample and of any sampling."""
    shard: str = ""
    """Run only block i of n of the problems ('i/n', 1-based: 1/2 and 2/2 are the halves) and write
    its per-problem records to <out>/<analysis>/<model>.shard-i-of-n.json; 'mechthink merge'
    recomputes the unsharded result from all n. '' = no sharding."""

    def __post_init__(self) -> None:
        from mechthink.shard import parse_shard

        self.out = Path(self.out)
        require(isinstance(self.model, str) and bool(self.model.strip()), "model", self.model,
                "pass a registry name, hub id, model directory or .gguf file")
        require(isinstance(self.n_samples, int) and not isinstance(self.n_samples, bool) and self.n_samples >= 1,
                "n_samples", self.n_samples, "use a positive integer")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", self.seed, "use an integer")
        if parse_shard(self.shard) is not None and not self.SHARDABLE:
            raise ConfigError(f"shard={self.shard!r} is not accepted: {self.NO_SHARD}")
        # Convention: every other int field named n_* or max_* is a count that must be >= 1
        # (>= 0 for the fields a subclass lists in ALLOW_ZERO, where 0 means "skip").
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith(("n_", "max_")) and isinstance(v, int) and not isinstance(v, bool):
                low = 0 if f.name in self.ALLOW_ZERO else 1
                require(v >= low, f.name, v, f"use an integer >= {low}")

    #: Count fields for which 0 is accepted (0 = skip that part).
    ALLOW_ZERO: ClassVar[tuple[str, ...]] = ()
    #: Whether the analysis runs per shard of its problems and merges exactly (mechthink.shard).
    SHARDABLE: ClassVar[bool] = False
    #: Why it does not (the error of --shard on it).
    NO_SHARD: ClassVar[str] = "this analysis does not support sharding; run it unsharded"


@dataclass
class ProblemConfig(AnalysisConfig):
    """An analysis that generates traces for problems (tiny-thinker's, or GSM8K for real models)."""

    max_new_tokens: int = 256
    """Generation budget per trace (tokens)."""
    gsm8k_path: str = ""
    """GSM8K test JSONL used for models other than tiny-thinker ('' = $MECHTHINK_DATA/gsm8k or
    the checkout's ../shared/data/gsm8k, else the hub)."""


@dataclass
class TraceConfig(ProblemConfig):
    """An analysis of one greedy trace per problem: generated, or imported from another engine."""

    traces: str = ""
    """JSONL file of traces generated by another engine (vLLM, SGLang, HF generate; see
    'mechthink import-traces') to analyse instead of generating them ('' = generate)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.traces == "" or Path(self.traces).is_file(), "traces", self.traces,
                "pass an existing JSONL file of engine outputs, or '' to generate the traces")
