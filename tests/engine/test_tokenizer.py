"""Tokenizer loading for the default model and for dummy models."""

from engine.config import ModelConfig
from engine.tokenizer import load_tokenizer
from engine.weights import resolve_model


def test_default_tokenizer_has_chat_template():
    tok = load_tokenizer(ModelConfig())
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token_id == 2 and len(tok) == 49152
    assert tok.decode(tok.encode("The capital of France is Paris.")) == "The capital of France is Paris."


def test_dummy_model_borrows_default_tokenizer():
    assert load_tokenizer("dummy:tiny-llama").vocab == load_tokenizer(resolve_model("smollm2")).vocab
