"""``python -m engine``: real subprocesses on the embedded model."""

import os
import subprocess
import sys
from pathlib import Path

from tests.engine.tiny_checkpoints import TOKENIZER_VOCAB_SIZE, lay_out_hub_cache, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, stdin=None, timeout=180, env=None):
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
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


def test_does_my_model_load_in_one_line(tmp_path):
    """`generate --model <id> --prompt hi`: a tiny checkpoint (sharded, with a tokenizer) by its directory and by
    its Hub id from an offline cache; an id that is nowhere fails with one line naming the model and the cause."""
    src = tmp_path / "tiny"
    save_tiny_checkpoint(src, "llama", max_shard_size="1MB", with_tokenizer=True, vocab_size=TOKENIZER_VOCAB_SIZE)
    cache = tmp_path / "hf-cache"
    lay_out_hub_cache(cache, "tiny-org/tiny-llama", src)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "VATTN_CACHE_DIR": str(tmp_path / "vattn")}
    for model in (str(src), "tiny-org/tiny-llama"):
        result = run_cli(
            "generate", "--model", model, "--prompt", "hi", "--max-tokens", "4", "--max-seq-len", "128", "-v", env=env
        )
        assert result.returncode == 0, result.stderr
        assert "output tokens" in result.stderr
    result = run_cli("generate", "--model", "nobody/nothing", "--prompt", "hi", env=env)
    assert result.returncode == 1
    assert "error: model 'nobody/nothing'" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr
