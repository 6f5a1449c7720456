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
