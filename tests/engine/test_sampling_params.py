import pytest

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.sampling_params import SamplingDefaults, SamplingParams


def test_defaults_are_valid_and_stop_string_is_normalized():
    params = SamplingParams(stop="###", stop_token_ids=None)
    assert params.stop == ["###"]
    assert params.stop_token_ids == []
    assert params.max_tokens == 16 and params.n == 1 and not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", 0),
        ("top_k", -2),
        ("seed", -1),
        ("stop", ["ok", ""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("logprobs", 21),
        ("logprobs", -1),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -2.5),
        ("n", 0),
        ("n", 17),
        ("n", 2.0),
        ("json_schema", '{"type": "object"}'),
        ("ignore_eos", "yes"),
        ("max_tokens", True),
    ],
)
def test_out_of_range_field_raises_invalid_request_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_n_up_to_sixteen_and_what_needs_the_output_on_the_host():
    assert SamplingParams(n=16).n == 16
    assert not SamplingParams().needs_output_on_host
    assert SamplingParams(presence_penalty=0.5).needs_output_on_host
    assert SamplingParams(json_schema={"type": "object"}).needs_output_on_host


def test_validate_rechecks_after_mutation():
    params = SamplingParams()
    params.top_k = -5
    with pytest.raises(InvalidRequestError) as info:
        params.validate()
    assert info.value.param == "top_k"


def test_error_hierarchy_and_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(PromptTooLongError("too long", param="max_tokens")))
    assert isinstance(err, InvalidRequestError) and err.param == "max_tokens" and err.message == "too long"


def test_generation_config_gives_the_defaults_it_names_and_skips_what_it_cannot():
    qwen_like = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [1, 2]}
    assert SamplingDefaults.from_generation_config(qwen_like) == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20)
    # top_k 0 is "off" in transformers; a value out of range is dropped (requests get the engine's default).
    off = SamplingDefaults.from_generation_config({"top_k": 0, "temperature": 5.0, "max_new_tokens": 64})
    assert off == SamplingDefaults(top_k=-1, max_tokens=64)
    assert SamplingDefaults.from_generation_config({}) == SamplingDefaults()


def test_defaults_fill_only_what_a_request_leaves_unset():
    defaults = SamplingDefaults(temperature=0.6, top_p=0.9)
    unset = defaults.params(temperature=None, top_p=None, top_k=None, seed=3)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.seed) == (0.6, 0.9, -1, 3)
    assert unset.max_tokens == SamplingParams().max_tokens
    chosen = defaults.params(temperature=0.0, top_p=1.0, max_tokens=5)
    assert (chosen.temperature, chosen.top_p, chosen.max_tokens) == (0.0, 1.0, 5)
    assert SamplingDefaults().params() == SamplingParams()
    with pytest.raises(InvalidRequestError) as info:
        defaults.params(top_p=0.0)
    assert info.value.param == "top_p"
