import pytest

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.sampling_params import SamplingParams


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
