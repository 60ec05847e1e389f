"""GRPO: the loss pieces against hand computation, the policy gradient's direction on a reward the tiny model can
move, the engine's rollouts, exact resume, outputs and bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

import deepsail as ds
from deepsail.cli import app
from deepsail.infer.engine import Engine, EngineConfig
from deepsail.infer.sampling import SamplingParams
from deepsail.train.config import TrainConfig
from deepsail.tune import grpo as G
from deepsail.tune import tasks as T
from deepsail.tune.finetune import resolve_base

SMALL = dict(prompts_per_step=2, num_generations=4, max_completion_tokens=6, eval_problems=4)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = G.group_advantages(r, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # torch's unbiased std, as trl uses
    assert torch.allclose(a[0], (r[0] - 0.5) / (std + 1e-4)) and torch.equal(a[1], torch.zeros(4))
    assert torch.allclose(G.group_advantages(r, "none")[0], r[0] - 0.5)
    assert torch.allclose(G.group_advantages(r, "batch")[0], (r[0] - 0.5) / (r.std() + 1e-4))


def _manual(logp, old, ref, adv, mask, beta, eps, loss_type, max_tokens):
    """The GRPO objective written out token by token (trl's GRPOTrainer._compute_loss, in loops)."""
    per_seq, all_tok = [], []
    for i in range(len(logp)):
        terms = []
        for t in range(len(logp[0])):
            if not mask[i, t]:
                continue
            ratio = math.exp(float(logp[i, t] - old[i, t]))
            a = float(adv[i])
            pg = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = float(ref[i, t] - logp[i, t])
            terms.append(pg + beta * (math.exp(d) - d - 1))
        per_seq.append(sum(terms) / len(terms))
        all_tok += terms
    if loss_type == "grpo":
        return sum(per_seq) / len(per_seq)
    if loss_type == "dapo":
        return sum(all_tok) / len(all_tok)
    return sum(all_tok) / (len(logp) * max_tokens)


@pytest.mark.parametrize("loss_type", G.LOSS_TYPES)
def test_policy_loss_matches_the_formula(loss_type):
    g = torch.Generator().manual_seed(0)
    B, Tn = 3, 5
    logp = -torch.rand(B, Tn, generator=g) * 3
    old = logp + torch.randn(B, Tn, generator=g) * 0.3  # ratios on both sides of the clip range
    ref = logp + torch.randn(B, Tn, generator=g) * 0.2
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    n_tok = int(mask.sum())
    norm = {"grpo": B, "dapo": n_tok, "dr_grpo": B * Tn}[loss_type]
    out = G.policy_loss(logp, old, ref, adv, mask, beta=0.04, eps_low=0.2, eps_high=0.2, loss_type=loss_type, norm=norm)
    want = _manual(logp, old, ref, adv, mask, 0.04, 0.2, loss_type, Tn)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    assert 0 < out["clip_frac"].item() < 1 and out["kl"].item() > 0


def test_at_ratio_one_the_gradient_is_the_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = G.policy_loss(
        logp, logp.detach(), None, adv, mask, beta=0, eps_low=0.2, eps_high=0.2, loss_type="dapo", norm=4
    )
    out["loss"].backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(2, 2) / 4)  # raise the log-prob of what beat its group
    assert "kl" not in out  # beta 0 runs no reference pass: the curves show no KL rather than a KL of 0


def test_step_advantages_blame_the_wrong_step_only(tiny_model_dir):
    tok = resolve_base(tiny_model_dir)[1]
    p = T.Problem("arithmetic", "What is 79 + 41?", "120", "79 + 41: 9+1=10 carry 1, 7+4+1=12 carry 1, so 120")
    right = T.demonstration(p)
    wrong = "<think>79 + 41: 9+1=10 carry 1, 7+4+1=11 carry 1, so 120</think>\n<answer>120</answer>"
    replies = [(t, tok.encode(t)) for t in (right, right, wrong, right)]
    for _, ids in replies:  # token boundaries: the summed pieces agree with decoding every prefix
        assert G.token_ends(tok, ids, tok.decode(ids)).tolist() == [
            len(tok.decode(ids[: k + 1])) for k in range(len(ids))
        ]
    adv = G.step_advantages(tok, replies, [p], 4, "none")
    # step 1 and step 3 ("so 120") all four got right: 0; step 2: rewards [1, 1, 0, 1] around their mean 0.75
    ids, ends = replies[2][1], G.token_ends(tok, replies[2][1], wrong).tolist()
    lo, hi = wrong.index("7+4+1=11 carry 1"), wrong.index("7+4+1=11 carry 1") + len("7+4+1=11 carry 1")
    for k, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        assert float(adv[2][k]) == pytest.approx(-0.75 if start < hi and end > lo else 0.0), tok.decode([ids[k]])
    assert all(float(a.min()) >= 0 and float(a.max()) == pytest.approx(0.25) for i, a in enumerate(adv) if i != 2)
    # and the loss takes per-token advantages: a constant row equals the per-sample advantage
    logp, old = torch.randn(3, 5), torch.randn(3, 5)
    adv_B, mask = torch.tensor([1.0, -0.5, 0.2]), torch.ones(3, 5, dtype=torch.bool)
    kw = dict(beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="dapo", norm=15.0)
    assert torch.equal(
        G.policy_loss(logp, old, None, adv_B, mask, **kw)["loss"],
        G.policy_loss(logp, old, None, adv_B[:, None].expand(3, 5), mask, **kw)["loss"],
    )


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="at least 2 samples"):
        G.GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        G.GRPOConfig(task="poetry")
    with pytest.raises(ValueError, match="--loss-type"):
        G.GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="--temperature"):
        G.GRPOConfig(temperature=0)
    with pytest.raises(ValueError, match="--process-weight >= 0"):
        G.GRPOConfig(process_weight=-1)


def test_engine_forgets_prefixes_when_the_weights_change(tiny_model_dir):
    model = ds.from_pretrained(tiny_model_dir)
    engine = Engine(model, None, EngineConfig(max_batch_size=2, num_blocks=16, block_size=4))
    prompt = list(range(1, 14))
    params = SamplingParams(max_tokens=3, temperature=0.0)
    first = engine.submit(prompt, params)
    engine.run_until_idle()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.reset_prefix_cache()
    again = engine.submit(prompt, params)
    engine.run_until_idle()
    fresh = Engine(model, None, EngineConfig(max_batch_size=2, num_blocks=16, block_size=4))
    want = fresh.submit(prompt, params)
    fresh.run_until_idle()
    assert first.result()[3]["prompt_tokens"] == len(prompt)
    assert again.result()[1] == want.result()[1] and engine.counters["prefix_hits"] == 0


def test_rollouts_compute_each_prompt_once(tiny_model_dir):
    """One sample per problem is prefilled first; the other G - 1 reuse all of its full prompt blocks, and every
    reply is what the request gets alone in a fresh engine."""
    model = ds.from_pretrained(tiny_model_dir).eval()
    bs, n = 4, 3
    problems = [list(range(1, 15)), list(range(1, 9)) + list(range(30, 37))]  # share 2 full blocks, then differ
    prompts = [problems[i // n] for i in range(2 * n)]
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=i) for i in range(2 * n)]
    engine = Engine(model, None, EngineConfig(max_batch_size=2 * n, num_blocks=64, block_size=bs))
    got = G.generate(engine, model, prompts, params)
    full = [(len(p) - 1) // bs * bs for p in problems]  # prompt tokens in full blocks (one is always computed)
    # the second problem's leader reuses the 2 blocks the first left; each follower, all full blocks of its problem
    assert engine.counters["prefix_hits"] == 2 * bs + (n - 1) * sum(full)
    for prompt, sp, (_, ids) in zip(prompts, params, got):
        alone = Engine(model, None, EngineConfig(max_batch_size=1, num_blocks=16, block_size=bs))
        want = alone.submit(prompt, sp)
        alone.run_until_idle()
        assert ids == want.result()[1]


def digit_share(reply: str, problem: T.Problem, format_weight: float = 0.1, steps_weight: float = 0.0) -> float:
    return sum(c.isdigit() for c in reply) / max(len(reply), 1)


def test_policy_gradient_raises_a_reward_the_model_can_reach(tiny_model_dir, tmp_path, monkeypatch):
    """On a random tiny model no arithmetic reward ever fires, so this swaps in one it can move: the share of the
    reply's characters that are digits. Twenty steps must raise the sampled reward; a sign error would lower it."""

    monkeypatch.setattr(T, "reward", digit_share)
    cfg = TrainConfig(
        out=str(tmp_path / "pg"),
        steps=24,
        lr=3e-3,
        min_lr=3e-3,
        warmup_steps=0,
        weight_decay=0.0,
        log_every=4,
        eval_every=0,
        ckpt_every=0,
        seed=0,
        precision="fp32",
        bias_update_rate=0.0,
    )
    gcfg = G.GRPOConfig(
        prompts_per_step=4, num_generations=8, max_completion_tokens=8, eval_problems=2, beta=0.0, temperature=1.0
    )
    r = G.grpo(tiny_model_dir, cfg, gcfg)
    rows = [json.loads(line) for line in open(r.train["metrics_path"]) if '"train"' in line]
    first, last = rows[0]["reward"], rows[-1]["reward"]
    assert last > first + 0.1, [round(x["reward"], 3) for x in rows]


def digit_marks(reply: str, problem: T.Problem) -> list[tuple[int, int, float]]:
    """Eight one-character "steps": right when the character is a digit."""
    return [(j, j + 1, float(reply[j].isdigit())) if j < len(reply) else (0, 0, 0.0) for j in range(8)]


def test_process_advantages_alone_move_the_policy(tiny_model_dir, tmp_path, monkeypatch):
    """With every reply's reward the same, the outcome advantages are all 0: only --process-weight's per-token
    advantages can teach. Judging each of the first 8 characters on its own (a digit is right) must raise the
    share of digits; advantages put on the wrong tokens, or with the wrong sign, would not."""
    monkeypatch.setattr(T, "reward", lambda *a, **k: 0.0)
    monkeypatch.setattr(T, "step_marks", digit_marks)
    monkeypatch.setattr(T, "accuracy_reward", lambda reply, p: sum(c.isdigit() for c in reply[:8]) / 8)  # logged
    cfg = TrainConfig(
        out=str(tmp_path / "ps"), steps=24, lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0, log_every=4,
        eval_every=0, ckpt_every=0, seed=0, precision="fp32", bias_update_rate=0.0,
    )  # fmt: skip
    gcfg = G.GRPOConfig(
        prompts_per_step=4, num_generations=8, max_completion_tokens=8, eval_problems=2, beta=0.0, process_weight=1.0
    )
    r = G.grpo(tiny_model_dir, cfg, gcfg)
    rows = [json.loads(line) for line in open(r.train["metrics_path"]) if '"train"' in line]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1, [round(x["accuracy"], 3) for x in rows]


@pytest.fixture(scope="module")
def run_args(tiny_model_dir):
    return [
        "grpo", str(tiny_model_dir), "--steps", "4", "--log-every", "1", "--eval-every", "2", "--ckpt-every", "1",
        "--precision", "fp32", "--num-iterations", "2", "--beta", "0.1", "--seed", "3", "--lr", "1e-3",
        "--process-weight", "0.5",
        *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()],
    ]  # fmt: skip


def test_run_writes_outputs_and_resumes_exactly(run_args, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "reward", digit_share)  # a reward the random model earns sometimes: the weights move
    runner = CliRunner()
    whole = tmp_path / "whole"
    r = runner.invoke(app, [*run_args, "--out", str(whole)])
    assert r.exit_code == 0, r.output
    for name in ("model/config.json", "model/tokenizer.json", "model/README.md", "report.md", "grpo.png"):
        assert (whole / name).is_file(), name
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["split"] == "train"]
    assert {"reward", "accuracy", "kl", "clip_frac", "completion_len"} <= set(train[0])
    assert any(x["kl"] > 0 for x in train[1:])  # the policy moved away from the reference
    assert [x["step"] for x in rows if x["split"] == "val"] == [2, 4]
    assert "| start |" in (whole / "report.md").read_text()

    # cut after step 3 (mid-way through a batch of rollouts reused mu = 2 times: the buffer must resume), then resume
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for p in ("checkpoints/step_000004", "model", "summary.json"):
        shutil.rmtree(cut / p) if (cut / p).is_dir() else (cut / p).unlink()
    (cut / "checkpoints/latest").write_text("step_000003\n")
    r = runner.invoke(app, [*run_args, "--out", str(cut), "--resume"])
    assert r.exit_code == 0, r.output
    a, b = ds.from_pretrained(whole / "model"), ds.from_pretrained(cut / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_lora_run_saves_an_adapter(run_args, tmp_path):
    out = tmp_path / "lora"
    r = CliRunner().invoke(app, [*run_args[:-4], *run_args[-4:], "--lora-r", "4", "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "adapter/adapter_config.json").is_file() and (out / "model/config.json").is_file()


def test_compiled_rollouts(run_args, tmp_path, monkeypatch):
    """--compile-rollouts samples through the compiled decode step (its weights updated in place every step)."""
    from deepsail.infer import graphs

    made = []
    monkeypatch.setattr(G, "enable_compiled_decode", lambda m: made.append(graphs.enable_compiled_decode(m)))
    out = tmp_path / "compiled"
    args = [*run_args, "--steps", "2", "--beta", "0", "--compile-rollouts", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert made and made[0].runs["step"] > 0 and (out / "model/config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("kl" in x for x in rows)  # --beta 0: not measured, and grpo.png says so


def test_bad_input_is_one_clear_line(tiny_model_dir, tmp_path):
    runner = CliRunner()
    base = [str(tiny_model_dir), "--out", str(tmp_path / "x")]
    r = runner.invoke(app, ["grpo", *base, "--num-generations", "1"])
    assert r.exit_code == 1 and "at least 2 samples per prompt" in r.output
    r = runner.invoke(app, ["grpo", *base, "--task", "poetry"])
    assert r.exit_code == 1 and "unknown task 'poetry'" in r.output
    r = runner.invoke(app, ["grpo", *base, "--prompts-per-step", "3", "--grad-accum", "2", "--steps", "1"])
    assert r.exit_code == 1 and "multiple of --grad-accum" in r.output


def test_sft_on_a_tasks_worked_demonstrations(tiny_model_dir, tmp_path):
    """The recipe's SFT stage: `--data embedded:TASK[:DIGITS]` trains on the task's demonstrations, validates on its
    held-out split; a misspelt task is one clear line."""
    out = tmp_path / "sft"
    args = [
        "sft",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--eval-every",
        "0",
        "--ewc-batches",
        "0",
        "--precision",
        "fp32",
    ]
    r = CliRunner().invoke(app, [*args, "--data", "embedded:sorting:1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "embedded:sorting:1" in (out / "report.md").read_text() and (out / "model/config.json").is_file()
    r = CliRunner().invoke(app, [*args, "--data", "embedded:poetry", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "embedded:TASK or embedded:TASK:DIGITS" in r.output


@pytest.mark.parametrize("preset", ["deepseek-v3-debug", "llama-3-8b-debug"])
def test_shared_prompt_scoring_equals_whole_rows(preset):
    """Each group's prompt runs once and its replies attend to its keys/values: log-probs and gradients must equal
    scoring every prompt + reply row on its own (prompts of different lengths, replies of different lengths)."""
    torch.manual_seed(0)
    model = ds.Transformer(ds.ModelConfig.preset(preset)).eval()  # MLA + MoE, and GQA + dense
    prompts = [[5, 9, 3, 7, 2], [4, 8, 6]]
    replies = [[11, 12, 13], [14], [15, 16, 17, 18], [19, 20]]  # G = 2: rows 0-1 answer prompt 0, rows 2-3 prompt 1
    b = G.rollout_tensors(prompts, replies, pad_id=0)
    weights = torch.randn(b["y"].shape)
    shared = G.token_logprobs(model, b, temperature=0.7)
    (shared * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    whole = torch.zeros_like(shared)
    for i, reply in enumerate(replies):
        ids = torch.tensor([prompts[i // 2] + reply])
        logits = model(ids).logits[0, len(prompts[i // 2]) - 1 : -1].float() / 0.7
        whole[i, : len(reply)] = logits.log_softmax(-1).gather(-1, torch.tensor(reply)[:, None])[:, 0]
    (whole * weights).sum().backward()
    assert torch.allclose(shared, whole, atol=1e-5), (shared - whole).abs().max()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n
