"""``python -m engine``: real subprocesses on the embedded model."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, stdin=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_prints_the_greedy_chat_answer():
    result = run_cli("generate", "--prompt", "What is the capital of France?", "--max-tokens", "16", "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "finish_reason=stop" in result.stderr


def test_chat_repl_answers_each_turn_and_exits_on_eof():
    result = run_cli("chat", "--max-tokens", "12", stdin="What is the capital of France?\n/reset\nHi\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.count("> ") >= 3  # a prompt per input line, then EOF


def test_bad_sampling_value_exits_2_naming_the_field():
    result = run_cli("generate", "--prompt", "hi", "--top-p", "0")
    assert result.returncode == 2
    assert "top_p" in result.stderr
