"""How well each attribution estimator ranks nodes: Spearman ρ against exact patching, per node type.

Prints, for mean ablation and the " Wait" logit at the last position:

* tiny-thinker: ``--n-examples`` planted-error examples, every node type, AtP / QK-fix / IG
  against exact patching of the whole grid (:func:`mechthink.attribution.compare_estimators`);
* the tiny random Llama of the tests (widened weights, strongly nonlinear), every node type;
* SmolLM2-135M (``--smollm2``): a 16-token prompt, every ``--layer-step``-th layer, AtP and
  QK-fix per node type (exact patching on those layers only).

The tests assert bounds on these numbers; this script reports them.
Run: ``python benchmarks/bench_attribution_rho.py [--n-examples 4] [--smollm2] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

import mechthink as mt
from mechthink import attribution as A
from mechthink import stats

ESTIMATORS = ("atp", "qkfix", "ig")


def _print_table(title: str, table: A.SpearmanTable) -> None:
    print(f"{title} ({table.n_samples} sequences), Spearman rho vs exact, mean:")
    means = table.mean()
    print("  " + "node".ljust(11) + "".join(e.rjust(9) for e in table.estimators))
    for n in table.nodes:
        print("  " + n.ljust(11) + "".join(f"{means[f'{e}/{n}']:9.3f}" for e in table.estimators))


def organism(n_examples: int) -> None:
    from mechthink.models.organism import step_examples

    model = mt.load_model("tiny-thinker")
    examples = step_examples(model, 60)
    means = A.mean_activations(model, [e.input_ids for e in examples], hooks=A.NODE_TYPES)
    metric = A.logit_metric(-1, model.token_variants("Wait")[" Wait"])
    seqs = [e.input_ids for e in examples if e.is_error][:n_examples]
    comp = A.compare_estimators(
        model, seqs, metric, means=means, estimators=dict.fromkeys(ESTIMATORS, A.NODE_TYPES), exact_nodes=A.NODE_TYPES,
        exact_batch_size=128,
    )
    _print_table("tiny-thinker, planted errors", comp.spearman())


def tiny_random() -> None:
    spec = importlib.util.spec_from_file_location("conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    tok = conftest.build_tokenizer(Path(tempfile.mkdtemp()), style="r1", add_bos=True)
    model = mt.load_model("tiny-random-LlamaForCausalLM", hf_model=conftest.build_model("LlamaForCausalLM", len(tok)),
                          tokenizer=tok, device="cpu")
    data = ["Wait, let me check that again.", "So the answer is 42. Therefore",
            "Compute 3 + 5 - 2 + 7. First 3 + 5 = 8.", "The user asks a question about numbers."]
    means = A.mean_activations(model, [model.to_tokens(t)[0] for t in data], hooks=A.NODE_TYPES)
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    toks = model.to_tokens("Hmm, the answer is 12. Alternatively, we could add")[0]
    comp = A.compare_estimators(model, [toks], metric, means=means, estimators=dict.fromkeys(ESTIMATORS, A.NODE_TYPES),
                                exact_nodes=A.NODE_TYPES)
    _print_table("tiny random Llama (widened weights), 1 prompt", comp.spearman())


def smollm2(layer_step: int) -> None:
    model = mt.load_model("smollm2-135m", device="cpu")
    toks = model.to_tokens("Tom has 3 apples and buys 5 more. So he has 8 apples. Wait")[0][:16]
    means = A.mean_activations(model, [toks], hooks=A.NODE_TYPES)
    metric = A.logit_metric(-1, model.token_ids("Wait"))
    layers = list(range(0, model.n_layers, layer_step))
    ex = A.activation_patching(model, toks, metric, "mean", nodes=A.NODE_TYPES, means=means, layers=layers, batch_size=48)
    print(f"SmolLM2-135M, 16 tokens, layers {layers}, Spearman rho vs exact:")
    for e in ("atp", "qkfix"):
        est = A.attribution_patching(model, toks, metric, "mean", nodes=A.NODE_TYPES, means=means, estimator=e)
        rho = {n: stats.spearman(est[n][layers], ex[n][layers]) for n in A.NODE_TYPES}
        print(f"  {e:6s} " + "  ".join(f"{n} {r:.3f}" for n, r in rho.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-examples", type=int, default=4, help="tiny-thinker planted-error examples")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (minutes on CPU)")
    ap.add_argument("--layer-step", type=int, default=5, help="SmolLM2: every n-th layer patched exactly")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    organism(args.n_examples)
    tiny_random()
    if args.smollm2:
        smollm2(args.layer_step)


if __name__ == "__main__":
    main()
