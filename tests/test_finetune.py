"""Fine-tuning end to end on the tiny model: staged runs keep frozen weights bitwise, resume is exact, SFT trains on
assistant tokens only, classification reports beside its baseline, EWC, per-request adapters in the engine and the
server, and every kind of bad input gets one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deepsail as ds
from deepsail.cli import app
from deepsail.data import Tokenizer
from deepsail.infer import Engine, EngineConfig, SamplingParams
from deepsail.model import IGNORE_INDEX
from deepsail.train import TrainConfig
from deepsail.tune.data import chat_examples, class_examples
from deepsail.tune.finetune import TuneConfig, finetune, tuned_lm_loss
from deepsail.tune.heads import load_head
from deepsail.tune.lora import AdapterSet, LoraConfig, apply_lora
from deepsail.tune.stages import read_stages

FAST = dict(batch_size=4, seq_len=64, log_every=2, eval_every=0, eval_batches=2, ckpt_every=0, warmup_steps=1)
CHATS = [
    {"messages": [{"role": "user", "content": f"Say {w} twice."}, {"role": "assistant", "content": f"{w} {w}"}]}
    for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")
]


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS * 3))
    return path


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), **{**FAST, **kw})


def test_sft_mask_is_exactly_the_assistant_tokens(tiny_model_dir):
    tok = Tokenizer.load(tiny_model_dir)
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye now"},
        ]
    }
    ex = chat_examples([record], tok, max_len=256)
    x, y = ex.inputs[0], ex.targets[0]
    trained = [t for t in y if t != IGNORE_INDEX]
    want = (
        tok.encode("Hello there") + [tok.token_to_id("<|end|>")] + tok.encode("Bye now") + [tok.token_to_id("<|end|>")]
    )
    assert trained == want  # every assistant token and its <|end|>, nothing of system/user/role tokens
    full = x + [want[-1]]
    for t in range(len(y)):  # and each target is the next token, at its own position
        assert y[t] in (IGNORE_INDEX, full[t + 1])
    # the loss runs the head on target positions only, and equals the full-logits cross-entropy
    model = ds.from_pretrained(tiny_model_dir).requires_grad_(False)  # frozen MTP: no MTP term in the loss
    x_BT, y_BT = torch.tensor([x]), torch.tensor([y])
    full = torch.nn.functional.cross_entropy(model(x_BT).logits[0].float(), y_BT[0], ignore_index=IGNORE_INDEX)
    assert abs(tuned_lm_loss(model, (x_BT, y_BT))["loss"].item() - full.item()) < 1e-5
    with pytest.raises(ValueError, match="no assistant turn"):
        chat_examples([{"messages": [{"role": "user", "content": "Hi"}]}], tok, 256)
    with pytest.raises(ValueError, match="message 0 must be"):
        chat_examples([{"messages": [{"role": "robot", "content": "Hi"}]}], tok, 256)


def test_staged_run_freezes_bitwise_and_writes_outputs(tiny_model_dir, chats_file, tmp_path):
    stages = tmp_path / "stages.json"
    stages.write_text(
        json.dumps(
            {"top": {"layers": [-1], "lr": 3e-3, "steps": 3}, "adapter": {"layers": "lora", "lr": 1e-3, "steps": 3}}
        )
    )
    base = ds.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out = tmp_path / "run"
    result = finetune(
        tiny_model_dir,
        _cfg(out),
        TuneConfig(stages=str(stages), lora_r=4, task="sft", ewc_batches=2),
        data=str(chats_file),
    )
    assert [s["stage"] for s in result.stages] == ["top", "adapter"]
    top = load_file(str(out / "stages/1_top/checkpoints/step_000003/tuned.safetensors"))
    assert top and all(k.startswith("layers.2.") for k in top)  # only the last block trained in stage 1
    for k, v in top.items():
        if ".lora_" not in k:
            assert not torch.equal(v, before[k]), f"{k} did not move"
    # Every weight outside the last block is bitwise the base's after both stages (LoRA merged in only in model/)
    final = load_file(str(out / "stages/2_adapter/checkpoints/step_000003/tuned.safetensors"))
    tuned = ds.from_pretrained(out / "model")
    merged = tuned.state_dict()
    lora_touched = {k.replace(".lora_A", ".weight") for k in final if ".lora_A" in k}
    for k, v in before.items():
        if not k.startswith("layers.2.") and k not in lora_touched:
            assert torch.equal(merged[k], v), f"frozen {k} changed"
    assert (out / "adapter/adapter_config.json").is_file() and (out / "model/fisher.safetensors").is_file()
    assert "base_model:" in (out / "model/README.md").read_text()  # model cards, peft's library for the adapter
    assert "library_name: peft" in (out / "adapter/README.md").read_text()
    report = (out / "report.md").read_text()
    assert "| top | 3 |" in report and "| adapter | 3 |" in report and "loss.png" in report
    # a checkpoint loads as the model it was when written: base + stage 1's block + the adapter (unmerged)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        from_ckpt = ds.from_pretrained(out / "stages/2_adapter/checkpoints/step_000003")(ids).logits
        assert (from_ckpt - tuned(ids).logits).abs().max() < 1e-4
        # and the adapter's own base is the stage-1 model, written beside it (its base_model_name_or_path)
        adapter_base = json.loads((out / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(adapter_base) == (out / "base").resolve()
        assert (ds.from_pretrained(out / "adapter")(ids).logits - tuned(ids).logits).abs().max() < 1e-4
    # an adapter folder as the base: the run trains on it merged, written as RUN/base, and its checkpoint loads
    again = tmp_path / "again"
    finetune(
        out / "adapter",
        _cfg(again, steps=1),
        TuneConfig(task="sft", ewc_batches=0),
        data=str(chats_file),
        steps_given=True,
    )
    assert (again / "base/config.json").is_file()
    with torch.no_grad():
        base_logits = ds.from_pretrained(again / "base")(ids).logits
        assert (base_logits - tuned(ids).logits).abs().max() < 1e-4
        assert ds.from_pretrained(again / "checkpoints/step_000001")(ids).logits.shape == base_logits.shape


def test_no_train_mtp_keeps_the_mtp_modules_bitwise(tiny_model_dir, chats_file, tmp_path):
    before = ds.from_pretrained(tiny_model_dir).state_dict()
    assert any(k.startswith("mtp.") for k in before)  # the tiny model has an MTP module to keep
    out = tmp_path / "run"
    tune = TuneConfig(task="sft", ewc_batches=0, train_mtp=False)
    finetune(tiny_model_dir, _cfg(out, steps=2, lr=3e-3), tune, data=str(chats_file), steps_given=True)
    saved = load_file(str(out / "checkpoints/step_000002/tuned.safetensors"))
    assert saved and not any(k.startswith("mtp.") for k in saved)  # the trunk trained, MTP did not
    after = ds.from_pretrained(out / "model").state_dict()
    assert not torch.equal(after["layers.0.self_attn.o_proj.weight"], before["layers.0.self_attn.o_proj.weight"])
    for k, v in before.items():
        if k.startswith("mtp."):
            assert torch.equal(after[k], v), f"{k} moved with --no-train-mtp"


def test_resume_after_a_kill_is_exact(tiny_model_dir, chats_file, tmp_path):
    tune = TuneConfig(lora_r=4, task="sft", ewc_batches=0)
    straight = tmp_path / "straight"
    finetune(tiny_model_dir, _cfg(straight, steps=4, ckpt_every=2), tune, data=str(chats_file), steps_given=True)
    killed = tmp_path / "killed"
    finetune(tiny_model_dir, _cfg(killed, steps=4, ckpt_every=2), tune, data=str(chats_file), steps_given=True)
    # as if killed between step 2's checkpoint and the end: later checkpoint and outputs gone, latest -> step 2
    shutil.rmtree(killed / "checkpoints/step_000004")
    for name in ("model", "adapter"):
        shutil.rmtree(killed / name)
    (killed / "summary.json").unlink()
    (killed / "checkpoints/latest").write_text("step_000002\n")
    finetune(
        tiny_model_dir, _cfg(killed, steps=4, ckpt_every=2), tune, data=str(chats_file), resume=True, steps_given=True
    )
    a = load_file(str(straight / "checkpoints/step_000004/tuned.safetensors"))
    b = load_file(str(killed / "checkpoints/step_000004/tuned.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (killed / "summary.json").unlink()
    with pytest.raises(ValueError, match="trained with other settings"):  # another rank cannot continue this run
        finetune(
            tiny_model_dir, _cfg(killed, steps=4), TuneConfig(lora_r=8, task="sft"), data=str(chats_file), resume=True
        )


def test_classify_reports_beside_bag_of_words(tiny_model_dir, tmp_path):
    rows = [{"text": ("good " * (i % 5 + 1)) + "day", "label": "pos"} for i in range(20)]
    rows += [{"text": ("bad " * (i % 5 + 1)) + "night", "label": "neg"} for i in range(20)]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clf"
    result = finetune(
        tiny_model_dir,
        _cfg(out, steps=6, lr=3e-3),
        TuneConfig(task="classify", lora_r=4, ewc_batches=1),
        data=str(data),
        steps_given=True,
    )
    assert {"accuracy", "macro_f1", "loss"} <= set(result.val) and result.baseline["accuracy"] > 0.9
    report = (out / "report.md").read_text()
    assert "bag-of-words logistic regression" in report and "macro-F1" in report
    assert json.loads((out / "model/classifier.json").read_text())["labels"] == ["neg", "pos"]
    card = (out / "model/README.md").read_text()
    assert 'pipeline_tag: "text-classification"' in card and "| bag_of_words_accuracy |" in card
    tok = Tokenizer.load(tiny_model_dir)
    clf = load_head(ds.from_pretrained(out / "model"), out / "model")  # the saved classifier loads back whole
    ids = torch.tensor([tok.encode("good good day")])
    assert clf.labels == ["neg", "pos"] and clf(ids, torch.tensor([ids.shape[1]])).shape == (1, 2)
    fisher = load_file(str(out / "model/fisher.safetensors"))  # the adapted trunk weights, not just the head
    assert "score.weight" in fisher and any(k.startswith("layers.") and k.endswith("q_a_proj.weight") for k in fisher)
    with pytest.raises(ValueError, match=r"record 0 .*label 'pos' is not one of --labels \['neg', 'maybe'\]"):
        class_examples(rows, tok, 64, ["neg", "maybe"])


def test_ewc_run_uses_the_previous_fisher(tiny_model_dir, chats_file, tmp_path):
    first = tmp_path / "a"
    finetune(
        tiny_model_dir,
        _cfg(first, steps=2),
        TuneConfig(task="sft", ewc_batches=2),
        data=str(chats_file),
        steps_given=True,
    )
    fisher = load_file(str(first / "model/fisher.safetensors"))
    assert fisher and all((f >= 0).all() for f in fisher.values()) and any(f.sum() > 0 for f in fisher.values())
    second = tmp_path / "b"
    result = finetune(
        first / "model",
        _cfg(second, steps=2),
        TuneConfig(task="sft", ewc_lambda=1e4, ewc_batches=0),
        data=str(chats_file),
        steps_given=True,
    )
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("ewc", 0) > 0 for r in rows if r["split"] == "train") and result.val
    with pytest.raises(ValueError, match="fisher.safetensors"):
        finetune(
            tiny_model_dir,
            _cfg(tmp_path / "c", steps=1),
            TuneConfig(task="sft", ewc_lambda=1.0),
            data=str(chats_file),
            steps_given=True,
        )


def test_bad_input_gets_one_clear_error(tiny_model_dir, chats_file, tmp_path):
    bad = tmp_path / "stages.json"
    bad.write_text(json.dumps({"s": {"layers": [-1], "lr": 1e-3, "epochs": 1, "lrate": 2}}))
    with pytest.raises(ValueError, match=r"stage 's': unknown key\(s\) \['lrate'\]"):
        read_stages(bad)
    bad.write_text(json.dumps({"s": {"layers": [7], "lr": 1e-3, "epochs": 1}}))
    with pytest.raises(ValueError, match="layer 7 is out of range: the model has 3 blocks"):
        finetune(tiny_model_dir, _cfg(tmp_path / "r1"), TuneConfig(stages=str(bad), task="sft"), data=str(chats_file))
    assert not (tmp_path / "r1" / "model").exists()
    no_reply = tmp_path / "no_reply.jsonl"
    no_reply.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n" + json.dumps(CHATS[0]) + "\n"
    )
    runner = CliRunner()
    r = runner.invoke(
        app, ["sft", str(tiny_model_dir), "--data", str(no_reply), "--out", str(tmp_path / "r2"), "--steps", "1"]
    )
    assert r.exit_code == 1 and "no assistant turn" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app,
        [
            "finetune",
            str(tiny_model_dir),
            "--data",
            str(chats_file),
            "--stages",
            str(tmp_path / "none.json"),
            "--out",
            str(tmp_path / "r3"),
        ],
    )
    assert r.exit_code == 1 and "no such file" in r.output


# --- adapters served per request ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for i, name in enumerate(("finance", "law")):
        m = ds.from_pretrained(tiny_model_dir)
        apply_lora(m, LoraConfig(r=4, alpha=8, targets=("q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "down_proj")))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out[name] = m.save_adapter(tmp_path_factory.mktemp(name) / "adapter")
    return out


def test_mixed_batch_gives_each_request_its_solo_output(tiny_model_dir, adapters):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22], [30] * 12, [100, 200, 300, 40]]
    which = [None, "finance", "law", "finance"]

    def solo(name: str | None, prompt: list[int]) -> list[int]:
        model = ds.from_pretrained(tiny_model_dir, adapter=adapters[name] if name else None)
        engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
        h = engine.submit(prompt, greedy)
        engine.run_until_idle()
        return h.result(timeout=0)[1]

    expected = [solo(n, p) for n, p in zip(which, prompts)]
    assert len({tuple(e) for e in expected}) == len(expected)  # the adapters really change the output
    served = ds.from_pretrained(tiny_model_dir)
    engine = Engine(served, None, EngineConfig(block_size=4, num_blocks=64), adapters=AdapterSet(served, adapters))
    handles = [engine.submit(p, greedy, adapter=n) for n, p in zip(which, prompts)]
    handles.append(engine.submit(prompts[1], greedy, adapter="law"))  # same prompt, other adapter: no prefix mixup
    engine.run_until_idle()
    got = [h.result(timeout=0)[1] for h in handles]
    assert got[:4] == expected and got[4] == solo("law", prompts[1])
    with pytest.raises(ValueError, match="unknown adapter 'medicine'"):
        engine.submit(prompts[0], greedy, adapter="medicine")


def test_server_routes_requests_by_model_name(tiny_model_dir, adapters):
    import httpx
    from test_serve import Live

    from deepsail.serve.app import ServerConfig, create_app, load_served

    config = ServerConfig(model_name="tiny")
    live = Live(create_app(lambda: load_served(tiny_model_dir, adapters=adapters, max_batch_size=4), config), config)
    try:
        live.wait_ready()
        ids = [m["id"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]]
        assert ids == ["tiny", "finance", "law"]
        body = {"prompt": "def f(x):", "max_tokens": 6, "temperature": 0}
        texts = {}
        for name in ("tiny", "finance", "law"):
            r = httpx.post(f"{live.url}/v1/completions", json={**body, "model": name}, timeout=30)
            assert r.status_code == 200 and r.json()["model"] == name
            texts[name] = r.json()["choices"][0]["text"]
        assert len(set(texts.values())) == 3
        r = httpx.post(f"{live.url}/v1/completions", json={**body, "model": "medicine"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "`finance`" in r.json()["error"]["message"]
    finally:
        live.close()
