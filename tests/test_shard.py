"""Sharding analyses over problems and merging: merged == unsharded, one-line errors otherwise."""

from __future__ import annotations

import dataclasses
import json

import pytest

import analyses
import mechthink as mt
from mechthink import shard
from mechthink.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

#: Small sizes (odd numbers of problems, so the shards differ in size).
SMALL = {"early_exit": dict(n_samples=5), "confidence_curve": dict(n_samples=3, n_points=4), "mi_peaks": dict(n_samples=3),
         "budget_forcing": dict(n_samples=3, budgets="2,8", extensions="0,1", max_new_tokens=60),
         "steering": dict(n_vector=8, n_samples=3, max_new_tokens=16, coeffs="-1,0,1", window=16)}


@pytest.fixture(scope="module")
def thinker():
    return mt.load_model("tiny-thinker")


@pytest.mark.parametrize("spec, want", [("", None), ("1/2", shard.Shard(1, 2)), (" 2 / 2 ", shard.Shard(2, 2)),
                                        ("1/1", shard.Shard(1, 1))])
def test_parse_shard(spec, want):
    assert shard.parse_shard(spec) == want


@pytest.mark.parametrize("spec, needle", [("0/2", "1-based"), ("3/2", "1-based"), ("a/b", "use i/n"), ("1/0", "1-based"),
                                          ("2", "use i/n"), ("1/2/3", "use i/n"), ("-1/2", "use i/n")])
def test_bad_shard_specs(spec, needle):
    with pytest.raises(ConfigError) as err:
        shard.parse_shard(spec)
    assert "shard=" in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_blocks_cover_every_problem_once(n, count):
    blocks = [shard.Shard(i, count).bounds(n) for i in range(1, count + 1)]
    assert [j for a, b in blocks for j in range(a, b)] == list(range(n))
    assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_every_analysis_has_shard_and_says_whether_it_merges():
    for name in analyses.REGISTRY:
        cfg_cls = analyses.get(name).Config
        assert "shard" in {f.name for f in dataclasses.fields(cfg_cls)}
        if cfg_cls.SHARDABLE:
            assert hasattr(analyses.get(name), "records") and hasattr(analyses.get(name), "aggregate"), name
            cfg_cls(shard="2/2")
        else:
            with pytest.raises(ConfigError, match=r"shard='1/2' is not accepted: .*run it unsharded"):
                cfg_cls(shard="1/2")
    assert {n for n in analyses.REGISTRY if analyses.get(n).Config.SHARDABLE} == set(SMALL)


def _numbers(out, name):
    return json.loads((out / name / "tiny-thinker.json").read_text())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_merged_equals_unsharded(thinker, tmp_path, name):
    module = analyses.get(name)
    full = module.main(module.Config(out=tmp_path / "full", **SMALL[name]), loaded_model=thinker)
    parts = [module.main(module.Config(out=tmp_path / "sharded", shard=f"{i}/2", **SMALL[name]), loaded_model=thinker)
             for i in (1, 2)]
    sizes = [p["n_problems"] for p in parts]
    assert 0 <= sizes[1] - sizes[0] <= 1 and sizes[0] >= 1
    assert not (tmp_path / "sharded" / name / "tiny-thinker.json").exists()  # shards aggregate nothing
    (js,) = shard.merge([tmp_path / "sharded"])
    merged = json.loads(js.read_text())
    assert merged["numbers"] == json.loads(json.dumps(full)) == _numbers(tmp_path / "full", name)["numbers"]
    assert js.with_suffix(".png").exists() and merged["config"]["shard"] == ""
    from mechthink.report import is_complete

    assert is_complete(tmp_path / "sharded", name, module.Config(out=tmp_path / "sharded", **SMALL[name]),
                       thinker.fingerprint())  # reproduce would reuse the merged result


def test_three_shards_and_cli_merge(thinker, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mechthink.cli as cli
    from analyses import early_exit

    monkeypatch.setattr(mt, "load_model", lambda *a, **k: thinker)
    full = early_exit.main(early_exit.Config(out=tmp_path / "full", n_samples=5), loaded_model=thinker)
    runner = CliRunner()
    for i in (1, 2, 3):  # each shard in its own --out folder, as on three machines
        res = runner.invoke(cli.app, ["early-exit", "--n-samples", "5", "--shard", f"{i}/3", "--out", str(tmp_path / f"m{i}")])
        assert res.exit_code == 0 and f"shard {i}/3" in res.output, res.output
    res = runner.invoke(cli.app, ["merge", *(str(tmp_path / f"m{i}") for i in (1, 2, 3)), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert _numbers(tmp_path / "merged", "early_exit")["numbers"] == json.loads(json.dumps(full))


@pytest.fixture(scope="module")
def two_shards(thinker, tmp_path_factory):
    from analyses import early_exit

    out = tmp_path_factory.mktemp("shards")
    for i in (1, 2):
        early_exit.main(early_exit.Config(out=out, n_samples=3, shard=f"{i}/2"), loaded_model=thinker)
    return out / "early_exit"


def _merge_error(paths, *needles):
    with pytest.raises((shard.ShardError, FileNotFoundError)) as err:
        shard.merge(paths)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_merge_errors(two_shards, tmp_path):
    one, two = two_shards / "tiny-thinker.shard-1-of-2.json", two_shards / "tiny-thinker.shard-2-of-2.json"
    _merge_error([one], "shards 2/2", "missing")
    d = json.loads(two.read_text())
    bad = tmp_path / "x.shard-2-of-2.json"
    bad.write_text(json.dumps({**d, "config": {**d["config"], "max_instances": 2}}))
    _merge_error([one, bad], "differ in config")
    bad.write_text(json.dumps({**d, "shard": [1, 2]}))
    _merge_error([one, bad], "are both shard 1/2")
    bad.write_text(json.dumps({**d, "shard": [2, 3]}))
    _merge_error([one, bad], "is shard 2/3")
    bad.write_text(json.dumps({**d, "model_fingerprint": "other"}))
    _merge_error([one, bad], "differ in model_fingerprint")
    bad.write_text(json.dumps(d)[:50])
    _merge_error([one, bad], "not valid JSON")
    bad.write_text(json.dumps({"numbers": {}}))
    _merge_error([one, bad], "not a complete shard file")
    _merge_error([tmp_path / "none"], "does not exist")
    (tmp_path / "empty").mkdir()
    _merge_error([tmp_path / "empty"], "holds no shard files")


@pytest.mark.parametrize("args, needle", [
    (["early-exit", "--shard", "0/2"], "1-based"),
    (["early-exit", "--shard", "3/2"], "1-based"),
    (["confidence-curve", "--shard", "a/b"], "use i/n"),
    (["readiness", "--shard", "1/2"], "fitted on the first half"),
    (["merge", "NOWHERE"], "does not exist"),
])
def test_cli_errors_one_line_before_loading(args, needle, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mechthink.cli as cli

    loads = []
    monkeypatch.setattr(mt, "load_model", lambda *a, **k: loads.append(a))
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    res = CliRunner().invoke(cli.app, args + ([] if args[0] == "merge" else ["--out", str(tmp_path)]))
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    assert not loads
