"""Structured output on the embedded SmolLM2-135M-Instruct: JSON held to a schema by the grammar's token mask."""

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarCompiler

# Both are dependencies on the CPU machines; the GPU image has neither (they would travel as wheels).
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

_PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}

# (what to ask for, the schema): nested objects, enums, arrays, numbers, booleans, null, $ref, anyOf, const.
SCHEMAS = [
    ("a person", _PERSON),
    (
        "a city and its country",
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
        },
    ),
    (
        "the colour of the sky",
        {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    ),
    (
        "a laptop and its price in dollars",
        {
            "type": "object",
            "properties": {"product": {"type": "string"}, "price": {"type": "number"}},
            "required": ["product", "price"],
        },
    ),
    (
        "three fruits",
        {
            "type": "object",
            "properties": {"fruits": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}},
            "required": ["fruits"],
        },
    ),
    (
        "a book with its author (name and birth year)",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "author": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
                    "required": ["name", "born"],
                },
            },
            "required": ["title", "author"],
        },
    ),
    (
        "whether water is wet",
        {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    ),
    (
        "a rating of a film from 1 to 5",
        {
            "type": "object",
            "properties": {"film": {"type": "string"}, "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["film", "stars"],
        },
    ),
    (
        "a point on a plane",
        {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
        },
    ),
    (
        "a weather report",
        {
            "type": "object",
            "properties": {
                "temperature_c": {"type": "number"},
                "sky": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
                "windy": {"type": "boolean"},
            },
            "required": ["temperature_c", "sky", "windy"],
        },
    ),
    (
        "two people",
        {
            "type": "object",
            "properties": {
                "people": {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 2, "maxItems": 2}
            },
            "required": ["people"],
            "$defs": {"person": _PERSON},
        },
    ),
    (
        "a list of up to four prime numbers",
        {
            "type": "object",
            "properties": {"primes": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4}},
            "required": ["primes"],
        },
    ),
    (
        "a traffic light state",
        {
            "type": "object",
            "properties": {
                "light": {"type": "string", "enum": ["red", "amber", "green"]},
                "seconds_left": {"type": "integer"},
            },
            "required": ["light", "seconds_left"],
        },
    ),
    (
        "a user with an optional nickname (null when none)",
        {
            "type": "object",
            "properties": {"username": {"type": "string"}, "nickname": {"type": ["string", "null"]}},
            "required": ["username", "nickname"],
        },
    ),
    (
        "an order with its items and quantities",
        {
            "type": "object",
            "properties": {
                "order_id": {"type": "integer"},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                        "required": ["name", "quantity"],
                    },
                    "minItems": 1,
                    "maxItems": 3,
                },
            },
            "required": ["order_id", "items"],
        },
    ),
    (
        "a shape: a circle with its radius or a square with its side",
        {
            "type": "object",
            "properties": {
                "shape": {
                    "anyOf": [
                        {
                            "type": "object",
                            "properties": {"kind": {"const": "circle"}, "radius": {"type": "number"}},
                            "required": ["kind", "radius"],
                        },
                        {
                            "type": "object",
                            "properties": {"kind": {"const": "square"}, "side": {"type": "number"}},
                            "required": ["kind", "side"],
                        },
                    ]
                }
            },
            "required": ["shape"],
        },
    ),
    (
        "a company with its address (street, city, zip code)",
        {
            "type": "object",
            "properties": {
                "company": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "city", "zip"],
                },
            },
            "required": ["company", "address"],
        },
    ),
    (
        "a matrix of 2 by 2 integers",
        {
            "type": "object",
            "properties": {
                "matrix": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["matrix"],
        },
    ),
    (
        "a task with a priority and tags",
        {
            "type": "object",
            "properties": {
                "task": {"type": "string"},
                "priority": {"enum": ["low", "medium", "high"]},
                "done": {"type": "boolean"},
                "tags": {"type": "array", "items": {"enum": ["home", "work", "urgent"]}, "maxItems": 3},
            },
            "required": ["task", "priority", "done", "tags"],
        },
    ),
    (
        "the version of a software release",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {
                    "type": "object",
                    "properties": {
                        "major": {"type": "integer", "minimum": 0},
                        "minor": {"type": "integer", "minimum": 0},
                        "patch": {"type": "integer", "minimum": 0},
                    },
                    "required": ["major", "minor", "patch"],
                },
                "stable": {"type": "boolean"},
            },
            "required": ["name", "version", "stable"],
        },
    ),
]


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig.from_dict(
        {"max_batch_size": 24, "max_seq_len": 512, "max_num_batched_tokens": 1024, "sampler_seed": 0}
    )
    eng = LLMEngine(config)
    yield eng
    eng.shutdown()


def chat_prompt(engine, content: str) -> list[int]:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_twenty_schemas_give_json_that_validates(engine):
    """One batch of 20 schemas of varied shapes, greedy: every output is complete JSON valid under its schema, and
    the engine's default asynchronous scheduling still builds each mask from the whole output."""
    assert len(SCHEMAS) == 20
    prompts = [chat_prompt(engine, f"Reply in JSON: {what}.") for what, _ in SCHEMAS]
    params = [SamplingParams(temperature=0.0, max_tokens=200, json_schema=schema) for _, schema in SCHEMAS]
    outs = engine.generate(prompts, params)
    for (what, schema), out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", (what, out.text)
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        assert out.token_ids[-1] in engine.eos_token_ids  # the grammar ended on the model's EOS
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_slots == stats.max_batch_size


def test_json_object_and_free_text_share_a_batch(engine):
    prompt = chat_prompt(engine, "What is the capital of France? Reply with a JSON object.")
    free, constrained = engine.generate(
        [prompt, prompt],
        [
            SamplingParams(temperature=0.0, max_tokens=60),
            SamplingParams(temperature=0.0, max_tokens=60, json_schema={"type": "object"}),
        ],
    )
    assert free.text.startswith("```json")  # left alone, the model fences its JSON and goes on in prose
    assert constrained.finish_reason == "stop", constrained.text
    assert isinstance(json.loads(constrained.text), dict)


def test_seeded_samples_each_follow_their_own_grammar(engine):
    schema = SCHEMAS[9][1]  # the weather report: enums, a number, a boolean
    prompt = chat_prompt(engine, "Reply in JSON: a weather report.")
    outs = engine.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=80, json_schema=schema))
    assert [o.index for o in outs] == [0, 1, 2, 3]
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in outs}) > 1


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "objekt"},
        {"type": "object", "properties": 5},
        {"type": "integer", "minimum": 5, "maximum": 2},
        {"$ref": "#/$defs/missing"},
        {"type": "string", "pattern": "(("},
    ],
)
def test_invalid_schema_is_rejected_and_the_engine_keeps_serving(engine, schema):
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad-schema", "Hi", SamplingParams(json_schema=schema))
    assert info.value.param == "json_schema" and "invalid JSON schema" in info.value.message
    assert "/project/" not in info.value.message  # no C++ source location
    assert "bad-schema" not in engine.requests
    assert engine.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=2))[0].num_output_tokens == 2


def test_sampler_masks_what_the_grammar_forbids(engine):
    """Logits that put all their mass on a token the grammar forbids still give an allowed one, in any row."""
    (grammar,) = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_token_ids).grammars(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}, 1
    )
    for text in ('{"', "ok", '":'):
        for token_id in engine.tokenizer.encode(text):
            grammar.accept_token(token_id)
    true_id, false_id, banned_id = (engine.tokenizer.encode(t)[0] for t in (" true", " false", " maybe"))
    logits = torch.zeros(3, engine.vocab_size)
    logits[:, banned_id] = 100.0
    logits[:, false_id] = 5.0
    logits[:, true_id] = 4.0
    sampler = Sampler("cpu", seed=0)
    greedy = SamplingParams(temperature=0.0)
    out = sampler(logits, [greedy] * 3, [[]] * 3, [None] * 3, [None, grammar, None])
    assert out.token_ids == [banned_id, false_id, banned_id]
    hot = SamplingParams(temperature=2.0)
    for _ in range(20):  # whatever is drawn (true, false or whitespace) is what the grammar allows
        (token_id,) = sampler(logits[1:2], [hot], [[]], [None], [grammar]).token_ids
        assert token_id != banned_id and grammar.matcher.fork().accept_token(token_id)
    with pytest.raises(ValueError, match="not allowed"):
        grammar.accept_token(banned_id)


@pytest.mark.gpu
def test_grammars_mask_cuda_logits_under_asynchronous_scheduling():
    """On CUDA the masks are filled on the host and copied without a wait; random weights under a schema whose
    every value is bounded still give valid JSON (greedy, and n=4 seeded samples), next to free requests, with the
    same tokens whether steps overlap or not."""
    schema = {
        "type": "object",
        "properties": {
            "sky": {"enum": ["sunny", "cloudy", "rainy"]},
            "windy": {"type": "boolean"},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"enum": ["home", "work"]}, "maxItems": 3},
        },
        "required": ["sky", "windy", "stars", "tags"],
    }
    eng = LLMEngine(
        EngineConfig.from_dict(
            {
                "model": "dummy:tiny-llama",
                "device": "cuda",
                "dtype": "bfloat16",
                "max_batch_size": 8,
                "max_seq_len": 512,
                "max_num_batched_tokens": 256,
                "kv_cache_memory_bytes": 8 * 4 * (2 << 20),
            }
        )
    )
    try:
        prompts = [[10, 20, 30, 40], [50, 60, 70], [80, 90]]
        params = [
            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=300, json_schema=schema),
            SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=300, json_schema=schema),
        ]
        outs = {}
        for overlap in (True, False):
            eng.async_scheduling = overlap
            outs[overlap] = eng.generate(prompts, params)
        assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
        free, *constrained = outs[True]
        assert free.num_output_tokens == 40
        assert [o.index for o in constrained] == [0, 0, 1, 2, 3]
        for out in constrained:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), schema)
    finally:
        eng.shutdown()
