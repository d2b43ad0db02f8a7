import pytest

from engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from engine.config import ModelConfig
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig())


def stream(tokenizer, token_ids, prompt_ids=(), stop=()):
    """Feed tokens one by one like the engine does; returns (chunks, detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), stop=stop)
    chunks = []
    for token_id in token_ids:
        if detok.append(token_id) is not None:
            break
        chunks.append(detok.take_new_text())
    chunks.append(detok.take_new_text(finished=True))
    return chunks, detok


MULTIBYTE_TEXT = "Café 🎉🚀 naïve 日本語のテキスト — emojis 👩‍👩‍👧 and ∑x² ok"


def test_multibyte_characters_never_stream_broken_utf8(tokenizer):
    ids = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    # The test only means something if some tokens are partial characters on their own.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    prompt = tokenizer.encode("Say something:", add_special_tokens=False)
    chunks, detok = stream(tokenizer, ids, prompt)
    for chunk in chunks:
        assert "\ufffd" not in chunk
        chunk.encode("utf-8")  # a lone surrogate would raise
    assert "".join(chunks) == MULTIBYTE_TEXT
    assert detok.output_text == tokenizer.decode(ids)
    assert sum(1 for c in chunks if c) > 10  # streamed in pieces, not all at the end


def test_output_cut_mid_character_drops_the_partial_bytes(tokenizer):
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial, "expected the emoji to span several byte tokens"
    cut = ids[: ids.index(partial[0]) + 1]
    chunks, detok = stream(tokenizer, cut)
    assert "".join(chunks) == "ok"
    assert all("\ufffd" not in c for c in chunks)


def test_stop_string_is_not_emitted_and_prefix_is_held_back(tokenizer):
    text = "The answer is 42.</end> trailing text"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["</end>"])
    emitted = ""
    matched = None
    for token_id in ids:
        matched = detok.append(token_id)
        emitted += detok.take_new_text(finished=matched is not None)
        # Never any part of the stop string on the wire before it is known not to be one.
        assert "<" not in emitted
        if matched:
            break
    assert matched == "</end>"
    assert detok.stop_reason == "</end>"
    assert emitted == "The answer is 42."
    assert detok.output_text == "The answer is 42."


def test_false_alarm_prefix_is_released(tokenizer):
    ids = tokenizer.encode("a </ending soon", add_special_tokens=False)
    chunks, detok = stream(tokenizer, ids, stop=["</end>"])
    assert detok.stop_reason is None
    assert "".join(chunks) == "a </ending soon"
    # "</end" was held while it could be the stop string: it only left after "ing" ruled that out.
    joined = ""
    for chunk in chunks:
        joined += chunk
        assert not joined.endswith("</end") and not joined.endswith("</")


def test_earliest_of_several_stop_strings_wins_even_across_token_boundaries(tokenizer):
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    chunks, detok = stream(tokenizer, ids, stop=["four", "o t", "three"])
    assert detok.stop_reason == "o t"
    assert "".join(chunks) == "one tw"


def test_held_text_is_released_when_the_request_finishes(tokenizer):
    ids = tokenizer.encode("Hello wor", add_special_tokens=False)
    chunks, detok = stream(tokenizer, ids, stop=["world"])
    assert chunks[-1].endswith("wor")  # held back until finished
    assert "".join(chunks) == "Hello wor"


def test_leading_space_of_output_is_kept_with_prompt_context(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    ids = tokenizer.encode(" world, again", add_special_tokens=False)
    chunks, _ = stream(tokenizer, ids, prompt)
    assert "".join(chunks) == " world, again"
