"""OpenAI request bodies into the engine's sampling parameters (no cluster needed)."""

import pytest

from deployments.openai_format import sampling_params
from deployments.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from engine.sampling_params import SamplingDefaults, SamplingParams

MODEL_DEFAULTS = SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20, max_tokens=100)


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_unset_fields_take_the_models_generation_config_defaults():
    params = sampling_params(_chat(), None, None, 500, MODEL_DEFAULTS, chat=True)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.9, 20, 100)
    # max_new_tokens never reaches past the room left in the context.
    assert sampling_params(_chat(), None, None, 50, MODEL_DEFAULTS, chat=True).max_tokens == 50


def test_fields_a_request_sets_win_over_the_models_defaults():
    body = CompletionRequest(model="m", prompt="hi", temperature=0.0, top_p=1.0, top_k=-1)
    params = sampling_params(body, 7, None, 500, MODEL_DEFAULTS, chat=False)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.0, 1.0, -1, 7)


def test_without_model_defaults_the_engine_defaults_apply():
    params = sampling_params(_chat(), None, None, 500, SamplingDefaults(), chat=True)
    engine = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (
        engine.temperature,
        engine.top_p,
        engine.top_k,
        500,
    )


def test_out_of_range_field_is_a_400_naming_it():
    with pytest.raises(OpenAIError) as info:
        sampling_params(_chat(top_p=0.0), None, None, 500, MODEL_DEFAULTS, chat=True)
    assert info.value.status_code == 400 and info.value.body()["error"]["param"] == "top_p"
