"""Image input to the OpenAI chat endpoint: a tiny random captioner served by the real app (TestClient), checked
against the caption path training's evaluation runs (`evaluate.generate_captions`: the same prompt, the engine)."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deepsail.model import ModelConfig
from deepsail.multimodal import models
from deepsail.multimodal.connector import CAPTION_PROMPT, IMAGE_TOKEN
from deepsail.multimodal.evaluate import generate_captions
from deepsail.multimodal.scenes import make_scenes
from deepsail.multimodal.train import scene_texts, train_tokenizer
from deepsail.multimodal.vision import VisionConfig
from deepsail.serve import ServerConfig, create_app, load_served
from deepsail.serve.protocol import MAX_IMAGES

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The engine thread, the image encoder's worker thread and the test share 2 CPU cores (see test_serve.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """(folder, model, tokenizer, config) of a random captioner: ViT 32 px, 8 px patches pooled 2x2 -> 4 image
    tokens, a debug decoder."""
    tok = train_tokenizer(scene_texts(600), 400, image_token=True)
    cfg = models.MMConfig(
        "caption",
        VisionConfig(image_size=SIZE, patch_size=8, hidden_size=64, num_layers=2, num_heads=4),
        decoder=ModelConfig.preset("deepseek-v3-debug").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0),
        image_token_id=tok._tok.token_to_id(IMAGE_TOKEN),
        pool=2,
    )
    torch.manual_seed(0)
    model = models.build(cfg).eval()
    folder = models.save(model, cfg, tmp_path_factory.mktemp("captioner") / "model", tok)
    return folder, model, tok, cfg


def _client(folder: Path) -> TestClient:
    # 4-token KV blocks: a caption prompt (18 ids) fills 4, so the prefix cache keeps blocks that hold the image
    # placeholders, and a second image with the same ids would hit them if the cache ignored the image. CPU fp32
    # on any machine: the references run there, and bf16 on a GPU would not give their exact tokens
    load = lambda: load_served(folder, device="cpu", max_model_len=256, block_size=4)  # noqa: E731
    return TestClient(create_app(load, ServerConfig(model_name="m")))


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(captioner):
    with _client(captioner[0]) as client:
        _wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def text_server(tiny_model_dir):
    with _client(tiny_model_dir) as client:
        _wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [s.render(SIZE) for s in make_scenes(3, 0, "test")]


def data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(parts: list[dict], **extra) -> dict:
    return {"messages": [{"role": "user", "content": parts}], "temperature": 0, "max_tokens": 8} | extra


def caption_request(image: np.ndarray, **extra) -> dict:
    return chat([image_part(data_url(image)), {"type": "text", "text": CAPTION_PROMPT}], **extra)


def test_served_caption_equals_the_training_path(server, captioner, images):
    """The served prompt is the one training rendered (<|image|> + text through the chat template), the image's
    tokens fill its placeholders, and two images in turn get their own answers (no prefix-cache hit across them)."""
    _, model, tok, cfg = captioner
    want = [generate_captions(model, tok, cfg, image[None], [CAPTION_PROMPT], 8)[0] for image in images[:2]]
    assert want[0] and want[1] and want[0] != want[1], want  # else the comparison below proves nothing
    # prompt_tokens counts the image's placeholders: the template's ids plus (4 - 1) for the one image
    n_prompt = len(tok.encode_chat([{"role": "user", "content": IMAGE_TOKEN + CAPTION_PROMPT}], True)[0]) + 4 - 1
    engine = server.app.state.deepsail.served.engine
    hits = []
    for image, ref in zip([images[0], images[1], images[0]], [want[0], want[1], want[0]]):
        before = engine.counters["prefix_hits"]
        r = server.post("/v1/chat/completions", json=caption_request(image))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"].strip() == ref
        assert body["usage"]["prompt_tokens"] == n_prompt
        hits.append(engine.counters["prefix_hits"] - before)
    assert hits[1] == 0 and hits[2] >= 8, hits  # the other image misses; the same image again hits its blocks


def test_streaming_and_n_choices_with_an_image(server, captioner, images):
    _, model, tok, cfg = captioner
    want = generate_captions(model, tok, cfg, images[1][None], [CAPTION_PROMPT], 8)[0]
    body = caption_request(images[1], stream=True, stream_options={"include_usage": True})
    with server.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text.strip() == want
    assert events[-1]["usage"]["prompt_tokens"] > 4

    r = server.post("/v1/chat/completions", json=caption_request(images[1], n=3))
    assert r.status_code == 200, r.text
    assert [c["message"]["content"].strip() for c in r.json()["choices"]] == [want] * 3


def test_tokenize_counts_the_image_tokens(server, captioner, images):
    body = {"messages": caption_request(images[0])["messages"]}
    body["messages"][0]["content"][0]["image_url"]["detail"] = "high"  # OpenAI's field: accepted, changes nothing
    r = server.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    image_id = captioner[3].image_token_id
    assert r.json()["tokens"].count(image_id) == 4


def _error(client: TestClient, body: dict, path: str = "/v1/chat/completions") -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_bad_images_are_400_naming_the_part(server, images):
    text = {"type": "text", "text": CAPTION_PROMPT}
    png = base64.b64encode(b"not a png at all").decode()
    for url, says in (
        ("https://example.com/cat.png", "only data: URLs are accepted"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        (f"data:image/png;base64,{png}", "not an image Pillow can decode"),
        ("data:text/plain;base64,aGk=", "media type"),
    ):
        err = _error(server, chat([text, image_part(url)]))
        assert err["message"].startswith("messages.0.content.1: ") and says in err["message"], err
        assert err["param"] == "messages.0.content.1.image_url.url"


def test_too_many_images_and_images_outside_user_turns_are_400(server, images):
    url = data_url(images[0])
    err = _error(server, chat([image_part(url)] * (MAX_IMAGES + 1)))
    assert err["param"] == "messages" and f"at most {MAX_IMAGES}" in err["message"], err
    body = {"messages": [{"role": "system", "content": [image_part(url)]}, {"role": "user", "content": "hi"}]}
    err = _error(server, body)
    assert err["param"] == "messages.0" and "images go in user messages" in err["message"], err
    err = _error(server, chat([{"type": "image_url", "text": "x"}]))
    assert err["param"] == "messages.0.content.0", err


def test_a_typed_placeholder_smuggles_no_image(server, images):
    """<|image|> typed as text would otherwise become a placeholder that reads some image's tokens (or none)."""
    url = data_url(images[0])
    for parts in (
        [image_part(url), {"type": "text", "text": f"{IMAGE_TOKEN} describe the image."}],
        [{"type": "text", "text": f"{IMAGE_TOKEN}describe the image."}],
    ):
        err = _error(server, chat(parts))
        assert err["param"] == "messages" and "cannot be typed as text" in err["message"], err
    err = _error(server, {"messages": [{"role": "user", "content": IMAGE_TOKEN}], "max_tokens": 2})
    assert "cannot be typed as text" in err["message"], err
    for path in ("/v1/completions", "/generate"):
        err = _error(server, {"prompt": f"{IMAGE_TOKEN}describe", "max_tokens": 2}, path)
        assert err["param"] == "prompt" and "cannot be typed as text" in err["message"], err


def test_completions_and_generate_take_no_parts(server, images):
    for path in ("/v1/completions", "/generate"):
        err = _error(server, {"prompt": [image_part(data_url(images[0]))], "max_tokens": 2}, path)
        assert err["param"] == "prompt" and "only in /v1/chat/completions" in err["message"], err


def test_a_text_only_model_refuses_images(text_server, images):
    err = _error(text_server, caption_request(images[0]))
    assert (
        err["message"].startswith("this model takes no images")
        and "deepsail mm train --task caption" in (err["message"])
    ), err
    assert err["param"] == "messages.0.content.0"
    # text parts alone still work, and a typed <|image|> is plain text to a model without the token
    r = text_server.post("/v1/chat/completions", json=chat([{"type": "text", "text": f"{IMAGE_TOKEN} hi"}]))
    assert r.status_code == 200, r.text
