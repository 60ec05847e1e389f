"""Edge/cloud routing (`deepsail serve --route edge=DIR --route cloud=DIR`, serve/route.py): the difficulty estimate
is the edge model's own prefill entropy, the threshold is calibrated to a cloud share, and the choice shows in the
response, its header and /metrics. Two tiny random models with one tokenizer stand in for edge and cloud."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from test_serve import Live, one_torch_thread  # noqa: F401  (one intra-op thread, as the serve tests)
from typer.testing import CliRunner

from deepsail.cli import app as cli_app
from deepsail.model import ModelConfig, Transformer
from deepsail.serve import ServerConfig, create_app
from deepsail.serve.app import load_routed
from deepsail.serve.route import calibrate, difficulty, held_out_prompts, parse_routes


@pytest.fixture(scope="module")
def cloud_dir(tiny_model_dir, tmp_path_factory):
    """Another random model beside the tiny one, with its tokenizer."""
    folder = tmp_path_factory.mktemp("cloud")
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    for extra in tiny_model_dir.glob("tokenizer_config.json"):
        shutil.copy(extra, folder)
    torch.manual_seed(1)
    Transformer(ModelConfig.preset("deepseek-v3-debug")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def routed(tiny_model_dir, cloud_dir):
    calibration = held_out_prompts(8, lengths=(20, 600))
    load = lambda: load_routed(  # noqa: E731
        {"edge": tiny_model_dir, "cloud": cloud_dir},
        cloud_share=0.5,
        calibration=calibration,
        max_model_len=256,
        max_batch_size=4,
    )
    cfg = ServerConfig()
    live = Live(create_app(load, cfg), cfg)
    live.wait_ready()
    yield live
    live.close()


def test_calibrate_difficulty_and_route_flags():
    scores = [1.0, 2.0, 3.0, 4.0]
    assert calibrate(scores, 0.5) == 2.5 and calibrate(scores, 0.25) == 3.5
    assert calibrate(scores, 0.0) > 4.0 and calibrate(scores, 1.0) < 1.0
    assert sum(s > calibrate(scores, 0.75) for s in scores) == 3
    with pytest.raises(ValueError, match="between 0 and 1"):
        calibrate(scores, 1.5)
    assert difficulty(2.0, 16, 0.25) == pytest.approx(3.0)
    for items, msg in (
        (["edge=/nonexistent"], "does not exist"),
        (["edge"], "expected edge=DIR"),
        (["fog=/tmp"], "expected edge=DIR"),
        (["edge=/tmp"], "cloud= is missing"),
        (["edge=/tmp", "edge=/tmp"], "twice"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_routes(items)
    r = CliRunner().invoke(cli_app, ["serve", "--route", "edge=/tmp"], env={"COLUMNS": "300"})
    assert r.exit_code != 0 and "cloud= is missing" in r.output
    r = CliRunner().invoke(cli_app, ["serve", "--help"])
    assert "--route" in r.output and "--cloud-share" in r.output


def test_prompt_entropy_is_the_models_own(tiny_model_dir):
    """The entropy the engine records beside each scored prompt token is H(softmax(logits)) at the position
    before it, as the plain model computes it."""
    from deepsail.infer.engine import Engine, EngineConfig
    from deepsail.serve.route import scoring_params

    model = Transformer.from_pretrained(tiny_model_dir).eval()
    engine = Engine(model, None, EngineConfig(max_model_len=128, max_batch_size=2))
    ids = list(range(5, 45))
    handle = engine.submit(ids, scoring_params())
    engine.run_until_idle()
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = (-(logp.exp() * logp).sum(-1))[:-1].tolist()
    got = handle.prompt_entropy
    assert got[0] is None and max(abs(a - b) for a, b in zip(got[1:], want)) < 1e-4


def test_routed_server_auto_explicit_metrics(routed, tiny_model_dir):
    url = routed.url
    router = routed.app.state.deepsail.served.router
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["auto", "edge", "cloud"]

    chat = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    route = body["route"]
    assert route["mode"] == "auto" and route["target"] == body["model"] in ("edge", "cloud")
    assert (route["difficulty"] > route["threshold"]) == (route["target"] == "cloud")
    assert r.headers["x-deepsail-route"].startswith(route["target"])

    # the threshold decides: everything to the cloud below every difficulty, to the edge above
    saved = router.threshold
    try:
        router.threshold = -1.0
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x = 1", "max_tokens": 2}).json()["model"] == "cloud"
        router.threshold = 1e9
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat | {"stream": True}, timeout=30) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert chunks and all(c["route"]["target"] == "edge" and c["model"] == "edge" for c in chunks)
    finally:
        router.threshold = saved

    # a named target is taken as asked
    r = httpx.post(f"{url}/v1/chat/completions", json=chat | {"model": "cloud"})
    assert r.json()["route"] == {"target": "cloud", "mode": "explicit", "difficulty": None, "threshold": None}
    r = httpx.post(f"{url}/generate", json={"prompt": "import os", "max_tokens": 2, "model": "edge"})
    assert r.status_code == 200 and r.headers["x-deepsail-route"] == "edge; mode=explicit"
    r = httpx.post(f"{url}/v1/chat/completions", json=chat | {"model": "tiny"})
    assert r.status_code == 404 and "`auto`, `edge`, `cloud`" in r.json()["error"]["message"]

    text = httpx.get(f"{url}/metrics").text
    assert 'deepsail_route_requests_total{mode="auto",target="cloud"} 1.0' in text
    assert 'deepsail_route_requests_total{mode="explicit",target="cloud"} 1.0' in text
    assert "deepsail_route_difficulty_count 3.0" in text and "deepsail_route_threshold" in text
    assert routed.app.state.deepsail.served.engine.stats()["kv_blocks_used"] == 0


def test_calibrated_threshold_splits_held_out_prompts(routed):
    """cloud_share=0.5 on 8 calibration prompts: the threshold sits between their 4th and 5th difficulty."""
    router = routed.app.state.deepsail.served.router
    tok = router.targets["edge"].tokenizer
    scores = [router.estimate_blocking(tok.encode(p)[:255]) for p in held_out_prompts(8, lengths=(20, 600))]
    assert sum(s > router.threshold for s in scores) == 4


def test_different_tokenizers_are_refused(tiny_model_dir, tmp_path):
    from deepsail.data import Tokenizer, default_corpus

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    Tokenizer.train([d.text for d in default_corpus("train", max_bytes=20_000)], vocab_size=300).save(other)
    with pytest.raises(ValueError, match="different tokenizers"):
        load_routed({"edge": tiny_model_dir, "cloud": other}, threshold=1.0, max_model_len=64)
