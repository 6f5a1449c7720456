"""Benchmark loaders (GSM8K, AIME 2024, MATH-500, generic JSONL) and answer parsing.

Answer conventions follow GSM8K (``#### <answer>``; Cobbe et al. 2021, arXiv:2110.14168) and
MATH (``\\boxed{...}``; Hendrycks et al. 2021, arXiv:2103.03874).
"""

from mechthink.data.answers import (
    answers_match,
    extract_boxed,
    last_number,
    normalize_number,
    parse_answer,
    parse_gsm8k_answer,
)
from mechthink.data.loaders import (
    Problem,
    default_data_dir,
    load_aime24,
    load_gsm8k,
    load_jsonl_problems,
    load_math500,
    read_jsonl,
    resolve_gsm8k_path,
)

__all__ = [
    "Problem",
    "answers_match",
    "default_data_dir",
    "extract_boxed",
    "last_number",
    "load_aime24",
    "load_gsm8k",
    "load_jsonl_problems",
    "load_math500",
    "normalize_number",
    "parse_answer",
    "parse_gsm8k_answer",
    "read_jsonl",
    "resolve_gsm8k_path",
]
