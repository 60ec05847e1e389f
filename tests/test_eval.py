"""`deepsail eval` and lm-eval-harness: deepsail's model class scores exactly as lm-eval's own `hf` backend does on the
same weights through transformers, lm-eval's `local-completions` client scores the same through `deepsail serve`
(with the server's tokenizer endpoints), and the verb writes its results, report and plot."""

from __future__ import annotations

import json
import math

import httpx
import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from test_serve import _serve
from typer.testing import CliRunner

from deepsail.cli import app
from deepsail.data import Tokenizer
from deepsail.eval.harness import DeepsailLM, task_manager
from deepsail.serve import ServerConfig

runner = CliRunner()
WINDOW = 128  # scoring window: short, so rolling log-likelihood crosses windows on a small document


@pytest.fixture(scope="module")
def ours(tiny_model_dir) -> DeepsailLM:
    return DeepsailLM(tiny_model_dir, dtype="fp32", max_length=WINDOW, progress=False)


@pytest.fixture(scope="module")
def tasks():
    return task_manager()


def _samples(lm, tasks, names: list[str], limit: int) -> dict[str, list[dict]]:
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=tasks, log_samples=True)
    return out["samples"]


def _scores(samples: dict[str, list[dict]]) -> list[float]:
    """Every log-likelihood a task asked for, in document and request order."""
    flat = []
    for task in sorted(samples):
        for doc in sorted(samples[task], key=lambda d: d["doc_id"]):
            for resp in doc["resps"]:
                value = resp[0]
                flat.append(float(value[0] if isinstance(value, list | tuple) else value))
    return flat


def test_same_scores_as_lm_evals_hf_backend(ours, tiny_model_dir, tasks):
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    hf = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", max_length=WINDOW, batch_size=8)
    names = ["deepsail_arithmetic", "deepsail_stdlib_package"]
    a, b = _scores(_samples(ours, tasks, names, 6)), _scores(_samples(hf, tasks, names, 6))
    assert len(a) == len(b) == 6 * 4 + 6 * 8  # 4 choices per problem, 8 package names per chunk
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))

    # rolling windows over a document 4x the window; an empty context (BOS-conditioned); a left-truncated context
    text = Tokenizer.load(tiny_model_dir).decode(list(range(40, 40 + 4 * WINDOW)))
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    x, y = ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling)
    assert abs(x[0] - y[0]) < 1e-4 * abs(y[0]), (x, y)
    pairs = [("", "def main():"), ("x = 1\n" * 100, "y = 2"), ("import os", "\nimport sys")]
    reqs = [Instance("loglikelihood", {}, p, 0) for p in pairs]
    for (lp, greedy), (hf_lp, hf_greedy) in zip(ours.loglikelihood(reqs), hf.loglikelihood(reqs)):
        assert abs(lp - hf_lp) < 1e-4 and greedy == hf_greedy

    # greedy generation stops where hf's does (hf may end on half a UTF-8 character; deepsail holds it back)
    gen = [Instance("generate_until", {}, ("def foo(", {"until": ["\n"], "max_gen_toks": 12}), 0)]
    assert ours.generate_until(gen)[0] == hf.generate_until(gen)[0].rstrip("\ufffd")


def test_lm_evals_local_completions_client_against_deepsail_serve(ours, tiny_model_dir, tasks):
    """lm-eval pointed at the server finds the tokenizer endpoints, sends token ids with echo + logprobs, and gets
    the scores deepsail's model class computes in process (before prompt scoring, every choice scored 0)."""
    live = _serve(tiny_model_dir, ServerConfig(model_name="tiny"), max_batch_size=8, max_model_len=512)
    try:
        url = live.url
        lm = lm_eval.api.registry.get_model("local-completions")(
            base_url=f"{url}/v1/completions", model="tiny", tokenizer_backend="auto", max_retries=1, max_length=WINDOW
        )
        assert lm.tokenizer_backend == "remote"  # found /tokenizer_info and /tokenize
        names = ["deepsail_arithmetic"]
        served, local = _scores(_samples(lm, tasks, names, 8)), _scores(_samples(ours, tasks, names, 8))
        assert len(served) == 32 and all(math.isfinite(v) and v < 0 for v in served)
        assert max(abs(x - y) for x, y in zip(served, local)) < 1e-4

        tok = Tokenizer.load(tiny_model_dir)
        r = httpx.post(f"{url}/tokenize", json={"prompt": "def f(x):\n", "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode("def f(x):\n") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == 512 and len(r["token_strs"]) == r["count"]
        chat = [{"role": "user", "content": "hi"}]
        r = httpx.post(f"{url}/tokenize", json={"messages": chat}).json()
        assert r["tokens"] == tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))
        ids = tok.encode("héllo <|eos|> wörld")
        assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "héllo <|eos|> wörld"
        info = httpx.get(f"{url}/tokenizer_info").json()
        assert info["eos_token"] == "<|eos|>" and info["chat_template"] == tok.chat_template
        assert info["model_max_length"] == 512 and info["vocab_size"] == tok.vocab_size
        for body, needle in [
            ({"prompt": "a", "messages": chat}, "exactly one of"),
            ({}, "exactly one of"),
            ({"prompt": "a", "model": "other"}, "does not exist"),
        ]:
            r = httpx.post(f"{url}/tokenize", json=body)
            assert r.status_code in (400, 404) and needle in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/detokenize", json={"tokens": [0, 10**6]})
        assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    finally:
        live.close()


def test_tokenizer_endpoints_need_the_api_key(tiny_model_dir):
    live = _serve(tiny_model_dir, ServerConfig(model_name="tiny", api_key="k"), max_batch_size=2, max_model_len=64)
    try:
        for method, path, body in [("POST", "/tokenize", {"prompt": "a"}), ("GET", "/tokenizer_info", None)]:
            assert httpx.request(method, live.url + path, json=body).status_code == 401
            ok = httpx.request(method, live.url + path, json=body, headers={"Authorization": "Bearer k"})
            assert ok.status_code == 200
    finally:
        live.close()


def test_eval_verb_writes_results_report_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", str(tiny_model_dir), "--tasks", "deepsail_arithmetic,deepsail_arithmetic_gen"]
    result = runner.invoke(app, [*args, "--limit", "3", "--out", str(out), "--log-samples", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())["results"]
    assert 0 <= results["deepsail_arithmetic"]["acc,none"] <= 1
    assert 0 <= results["deepsail_arithmetic_gen"]["exact_match,strip"] <= 1
    report = (out / "report.md").read_text()
    assert "deepsail_arithmetic" in report and "eval_scores.png" in report
    assert (out / "eval_scores.png").stat().st_size > 5_000
    rows = [json.loads(line) for line in (out / "samples_deepsail_arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["resps"]) == 4 for r in rows)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--tasks", "deepsail_arithmetik"], "did you mean deepsail_arithmetic"),
        (["--tasks", " , "], "--tasks is empty"),
        (["--limit", "2.5"], "--limit must be"),
        (["--include-path", "/nonexistent/tasks"], "is not a folder of task YAMLs"),
    ],
)
def test_eval_verb_bad_input_is_one_line(tiny_model_dir, tmp_path, extra, needle):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--out", str(tmp_path / "x"), *extra])
    assert result.exit_code == 1 and needle in result.output, result.output
    assert "Traceback" not in result.output
