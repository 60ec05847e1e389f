"""Structured output (response_format json_object / json_schema): a grammar mask in the batched sampler.

The tiny model is random, the hardest case there is: nothing but the mask makes its output JSON. Every request that
ends with "stop" must parse and validate against its schema (jsonschema), whatever the seed; one that runs out of
max_tokens ends with "length" and its text must still be a prefix the grammar accepts.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import torch
from test_serve import _serve, one_torch_thread  # noqa: F401  (one intra-op thread, as the serve tests)

pytest.importorskip("llguidance")

from deepsail.data import Tokenizer  # noqa: E402
from deepsail.infer import Engine, EngineConfig, SamplingParams, generate  # noqa: E402
from deepsail.infer.generate import load  # noqa: E402
from deepsail.infer.sampling import DecodeState  # noqa: E402
from deepsail.infer.structured import JSON_OBJECT, Grammar, allowed_tokens, compile_schema  # noqa: E402
from deepsail.serve import ServerConfig  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "city": {"type": "string", "maxLength": 8},
            },
            "required": ["zip"],
            "additionalProperties": False,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load(tiny_model_dir, device="cpu", dtype="fp32")
    return model, tok


def _prefix_ok(schema: str, tok: Tokenizer, ids: list[int]) -> bool:
    """The grammar accepts every one of `ids` in order: the text is a valid prefix of a valid document."""
    return Grammar(schema, tok, {tok.eos_id}).allows(ids) == len(ids)


def _check(schema: dict | None, text: str, ids: list[int], reason: str, tok: Tokenizer) -> None:
    if reason == "stop":
        doc = json.loads(text)
        jsonschema.validate(doc, schema or {"type": "object"})
    else:
        assert reason == "length" and _prefix_ok(json.dumps(schema) if schema else JSON_OBJECT, tok, ids), text


def test_every_seed_parses_and_validates_in_the_batched_engine(tiny):
    """76 requests in one engine, sampled (temperature 1, a seed each) and greedy, schema and json_object side by
    side with unconstrained rows: the constrained ones are JSON, the free ones are not held to it."""
    model, tok = tiny
    engine = Engine(model, tok, EngineConfig(max_batch_size=76, num_blocks=1024))
    schema = json.dumps(PERSON)
    jobs = []
    for seed in range(64):
        jobs.append((PERSON, SamplingParams(max_tokens=128, temperature=1.0, seed=seed, json_schema=schema)))
    for seed in range(8):
        jobs.append((None, SamplingParams(max_tokens=48, temperature=1.0, seed=seed, json_schema=JSON_OBJECT)))
    jobs.append((PERSON, SamplingParams(max_tokens=128, temperature=0, json_schema=schema)))
    jobs += [("free", SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True)) for s in range(3)]
    handles = [engine.submit(tok.encode(f"Person {i}:"), p) for i, (_, p) in enumerate(jobs)]
    engine.run_until_idle()
    reasons = []
    for (schema_, _), h in zip(jobs, handles):
        text, ids, reason, _ = h.result(timeout=0)
        if schema_ == "free":
            assert reason == "length" and len(ids) == 16
            continue
        reasons.append(reason)
        _check(schema_, text, ids, reason, tok)
    # The schema bounds every string and number, so the mask closes it within 128 tokens every time (the longest of
    # 100 seeds took 93); an open json_object on a random model runs out about a third of the time (checked above).
    assert reasons[:64].count("stop") == 64 and reasons[-1] == "stop", reasons


def test_max_tokens_running_out_ends_with_length_and_a_valid_prefix(tiny):
    model, tok = tiny
    schema = json.dumps(PERSON)
    for seed in range(6):
        g = generate(model, tok, "x", max_tokens=5, temperature=1.0, seed=seed, json_schema=schema)[0]
        assert g.finish_reason == "length" and len(g.token_ids) == 5 and g.text.startswith('{"name":')
        assert _prefix_ok(schema, tok, g.token_ids)
        with pytest.raises(json.JSONDecodeError):
            json.loads(g.text)


def test_mask_rows_and_model_padding(tiny):
    """Unconstrained rows keep every id; constrained rows never get ids past the tokenizer's vocabulary (a model
    padded to a larger vocabulary); logprobs stay the model's own, not the masked distribution's."""
    model, tok = tiny
    g = Grammar(JSON_OBJECT, tok, {tok.eos_id})
    allowed = allowed_tokens([None, g], tok.vocab_size + 40, torch.device("cpu"))
    assert allowed[0].all() and allowed[1].sum() == 1 and allowed[1, tok.encode("{")[0]]
    assert not allowed[1, tok.vocab_size :].any()
    state = DecodeState(tok.encode("hi"), SamplingParams(temperature=0, logprobs=0, json_schema=JSON_OBJECT), tok, {1})
    from deepsail.infer.sampling import sample_states

    logits = torch.randn(1, model.config.vocab_size)
    (event,) = sample_states(logits, [state])
    assert event.token_id == tok.encode("{")[0]
    assert event.logprob == pytest.approx(logits.log_softmax(-1)[0, event.token_id].item())


@pytest.mark.parametrize(
    "schema, words",
    [
        ('{"type": "object", "not": {"required": ["a"]}}', "not"),
        ('{"type": "string", "pattern": "(?=a)b"}', "look-around"),
        ('{"type": "nonsense"}', "nonsense"),
        ("[1, 2]", "JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_unsupported_schemas_are_value_errors_naming_why(schema, words):
    with pytest.raises(ValueError, match=words):
        compile_schema(schema)


def test_structured_output_refuses_stop_rules():
    with pytest.raises(ValueError, match="stop strings"):
        SamplingParams(json_schema=JSON_OBJECT, stop=["}"])
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(json_schema=JSON_OBJECT, ignore_eos=True)


# --- over HTTP -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir):
    live = _serve(tiny_model_dir, ServerConfig(model_name="tiny"), max_batch_size=16, max_model_len=512)
    yield live
    live.close()


def _stream(url: str, path: str, body: dict) -> tuple[str, str]:
    text, reason = "", None
    with httpx.stream("POST", url + path, json=body | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("text") or choice.get("delta", {}).get("content") or ""
                reason = choice["finish_reason"] or reason
    return text, reason


def test_response_format_on_both_endpoints_streamed_and_not(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chat = {"messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 96}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat | {"response_format": fmt, "n": 3, "seed": 1})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert c["finish_reason"] == "stop"
        jsonschema.validate(json.loads(c["message"]["content"]), PERSON)
    text, reason = _stream(server.url, "/v1/chat/completions", chat | {"response_format": fmt, "seed": 2})
    assert reason == "stop" and jsonschema.validate(json.loads(text), PERSON) is None

    body = {"prompt": "JSON:", "max_tokens": 96, "temperature": 0, "response_format": {"type": "json_object"}}
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 200 and isinstance(json.loads(r.json()["choices"][0]["text"]), dict), r.text
    text, reason = _stream(server.url, "/v1/completions", body | {"response_format": fmt, "temperature": 1})
    assert reason == "stop" and jsonschema.validate(json.loads(text), PERSON) is None
    r = httpx.post(f"{server.url}/v1/completions", json=body | {"response_format": fmt, "max_tokens": 3})
    assert r.json()["choices"][0]["finish_reason"] == "length"  # honest: the JSON is not finished


@pytest.mark.parametrize(
    "fmt, words",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "not"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs its schema"),
        ({"type": "xml"}, "not supported"),
    ],
)
def test_unsupported_response_format_is_400_naming_it(server, fmt, words):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "response_format": fmt})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "response_format" and words in err["message"], err
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "x", "stop": ["}"], "response_format": {"type": "json_object"}}
    )
    assert r.status_code == 400 and "stop strings" in r.json()["error"]["message"]
