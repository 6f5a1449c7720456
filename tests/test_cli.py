"""The `mechthink` command."""

from __future__ import annotations

from typer.testing import CliRunner

from mechthink.cli import app

runner = CliRunner()


def test_models_lists_registry():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in ("DeepSeek-R1-Distill-Llama-8B", "Qwen3-4B-Thinking-2507", "smollm2-135m", "tiny-thinker"):
        assert name in result.output


def test_reproduce_rejects_unknown_analysis():
    result = runner.invoke(app, ["reproduce", "--only", "no_such_analysis"])
    assert result.exit_code != 0
    assert "unknown analyses" in result.output


def test_one_subcommand_per_analysis_generated_from_config(tmp_path):
    from mechthink.cli import discover_analyses

    names = list(discover_analyses())
    help_text = runner.invoke(app, ["--help"]).output
    for name in names:
        assert name.replace("_", "-") in help_text
    result = runner.invoke(app, ["mi-peaks", "--n-samples", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mi_peaks" / "tiny-thinker.json").exists()
