"""DPO: the loss is trl's (its own code run on the same log-probs), log-probs count reply tokens only, a run on the
tiny model raises held-out preference accuracy and margin, the reference is computed once and a resume is exact,
and bad input gets one clear error."""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import deepsail as ds
import deepsail.tune.dpo as D
from deepsail.data import Tokenizer
from deepsail.errors import cli_verb
from deepsail.model import IGNORE_INDEX
from deepsail.train import TrainConfig
from deepsail.tune.dpo import DPOConfig, dpo, dpo_command, dpo_loss, pair_examples, sequence_logps
from deepsail.tune.finetune import TuneConfig

FAST = dict(
    batch_size=4,
    seq_len=64,
    precision="fp32",
    log_every=2,
    eval_every=0,
    ckpt_every=0,
    warmup_steps=1,
    weight_decay=0.0,
)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on one thread: a second intra-op thread only waits for a core the machine's other work holds
    (deepsail/threads.py): on a busy 2-core machine this file took 73 s with two threads, 16 s with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    """An easy preference: say yes, not no. Any prompt held out still shows whether the model learned it."""
    rows = [
        {"prompt": f"Do you like {w} {i}?", "chosen": f"yes, {w}", "rejected": f"no, {w}"}
        for i in range(3)
        for w in WORDS
    ]
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), **{**FAST, **kw})


# --- the loss against trl's ------------------------------------------------------------------------------------------
def _trl_loss(loss_type: str, beta: float, pc, pr, rc, rr, lengths, label_smoothing: float = 0.0, sft: float = 0.0):
    """trl 1.16's DPOTrainer._compute_loss on a stub trainer whose "model" returns fixed per-token log-probs that sum
    to the policy's sequence log-probs (trl has no standalone loss function: it lives inside that method)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T = len(pc), int(lengths.max()) + 3
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion_mask[row, T - n :] = 1  # prompts of different lengths before each completion
    shifted = completion_mask[:, 1:].double()
    # float64 and seeded: the rows must sum to the given log-probs to well under the 1e-6 compared
    per_token = torch.rand(2 * B, T - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * shifted
    per_token = per_token / per_token.sum(1, keepdim=True) * torch.cat([pc, pr])[:, None]  # rows sum to the logps

    def model(**_):
        zeros = torch.zeros(2 * B, T - 1, dtype=torch.float64)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    stub = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type, "sft"] if sft else [loss_type],
        loss_weights=[1.0, sft] if sft else [1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.randint(0, 100, (2 * B, T)),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_is_trls(loss_type):
    g = torch.Generator().manual_seed(0)
    B = 16
    pc, pr, rc, rr = (-torch.rand(B, generator=g, dtype=torch.float64) * 40 - 1 for _ in range(4))
    lengths = torch.randint(1, 30, (2 * B,), generator=g)
    for beta in (0.1, 0.5):
        want, metrics = _trl_loss(loss_type, beta, pc, pr, rc, rr, lengths)
        losses, chosen, rejected = dpo_loss(
            pc, pr, rc, rr, beta, loss_type, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:]
        )
        assert abs(losses.mean().item() - want.item()) < 1e-6
        assert abs(chosen.mean().item() - metrics["rewards/chosen"]) < 1e-6
        assert abs((chosen - rejected).mean().item() - metrics["rewards/margins"]) < 1e-6
        assert abs((chosen > rejected).double().mean().item() - metrics["rewards/accuracies"]) < 1e-6
    if loss_type == "sigmoid":
        # label smoothing (conservative DPO): each label flipped with probability e, i.e. trl's loss on the pairs as
        # given, weighted 1-e, plus its loss on the same pairs swapped, weighted e
        e = 0.2
        kept, _ = _trl_loss("sigmoid", 0.1, pc, pr, rc, rr, lengths)
        flipped, _ = _trl_loss("sigmoid", 0.1, pr, pc, rr, rc, lengths.roll(B))
        losses, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", e)
        assert abs(losses.mean().item() - ((1 - e) * kept + e * flipped).item()) < 1e-6
        # RPO: trl's ["sigmoid", "sft"] losses, the chosen replies' token-mean NLL weighted beside the DPO loss
        want, _ = _trl_loss("sigmoid", 0.1, pc, pr, rc, rr, lengths, sft=0.5)
        dpo = DPOConfig(beta=0.1, sft_weight=0.5)
        got = D.objective(D.pair_stats(torch.cat([pc, pr]), torch.cat([rc, rr]), lengths, dpo), dpo)["loss"]
        assert abs(got.item() - want.item()) < 1e-6
    else:
        with pytest.raises(ValueError, match="needs chosen_lengths"):
            dpo_loss(pc, pr, rc, rr, 0.1, "ipo")


# --- reply tokens and their log-probs --------------------------------------------------------------------------------
def test_reply_tokens_and_logps(tiny_model_dir):
    tok = Tokenizer.load(tiny_model_dir)
    end = tok.token_to_id("<|end|>")
    chat = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": "Hello there",
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }
    pairs = pair_examples([chat], tok, max_len=128)
    for side, reply in ((pairs.chosen, "Hello there"), (pairs.rejected, "Go away")):
        x, y = side.inputs[0], side.targets[0]
        assert [t for t in y if t != IGNORE_INDEX] == tok.encode(reply) + [end]  # the reply and its <|end|>, no more
        full = x + [y[-1]]
        assert all(t in (IGNORE_INDEX, full[i + 1]) for i, t in enumerate(y))  # each target the next token
    # the same prompt renders identically on both sides: only the replies differ
    start = next(i for i, t in enumerate(pairs.chosen.targets[0]) if t != IGNORE_INDEX)
    assert pairs.chosen.inputs[0][: start + 1] == pairs.rejected.inputs[0][: start + 1]
    # plain text (no template): the reply's tokens and EOS
    plain = pair_examples([{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}], tok, 64, fmt="plain")
    assert [t for t in plain.chosen.targets[0] if t != IGNORE_INDEX] == tok.encode(" 4") + [tok.eos_id]

    model = ds.from_pretrained(tiny_model_dir).eval()
    batch = D.PairBatches(pairs, 4 * 128, tok.pad_id, 0, torch.device("cpu"))
    x, y, _ = batch.collate(torch.arange(1).numpy())
    with torch.no_grad():
        got = sequence_logps(model, x, y)
        logp = torch.log_softmax(model(x).logits.float(), -1)
    for row in range(2):
        want = sum(logp[row, t, y[row, t]] for t in range(y.shape[1]) if y[row, t] != IGNORE_INDEX)
        assert abs(got[row].item() - want.item()) < 1e-4


# --- a run ------------------------------------------------------------------------------------------------------------
def test_run_raises_held_out_preference(tiny_model_dir, prefs, tmp_path):
    out = tmp_path / "run"
    r = dpo(
        tiny_model_dir,
        _cfg(out, steps=8, lr=1e-3),
        TuneConfig(val_fraction=0.2, lora_dropout=0.0),
        DPOConfig(beta=0.1),
        data=str(prefs),
        steps_given=True,
    )
    assert r.before["accuracy"] == 0 and r.before["reward_margin"] == 0  # every reward is 0 before the first step
    assert abs(r.before["loss"] - 0.693147) < 1e-5  # log 2
    assert r.val["accuracy"] > 0.9 and r.val["reward_margin"] > 0.1 and r.val["loss"] < r.before["loss"]
    assert r.val["logp_accuracy"] > r.before["logp_accuracy"]
    for name in ("model/config.json", "model/README.md", "reference.safetensors", "loss.png", "rewards.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| before (the reference) | 0.6931 |" in report and "rewards.png" in report
    assert "dpo" in (out / "model/README.md").read_text()
    tuned, base = ds.from_pretrained(out / "model").state_dict(), ds.from_pretrained(tiny_model_dir).state_dict()
    mtp = [k for k in base if k.startswith("mtp.")]
    assert mtp and all(torch.equal(tuned[k], base[k]) for k in mtp)  # the DPO loss never reaches the MTP modules
    assert not torch.equal(tuned["layers.0.self_attn.o_proj.weight"], base["layers.0.self_attn.o_proj.weight"])


def test_reference_once_and_resume_exact(tiny_model_dir, prefs, tmp_path, monkeypatch):
    tune = TuneConfig(lora_r=4, val_fraction=0.2, lora_dropout=0.0)
    ipo = DPOConfig(loss_type="ipo", beta=0.5)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for out in (straight, killed):
        dpo(tiny_model_dir, _cfg(out, steps=4, ckpt_every=2, lr=1e-3), tune, ipo, data=str(prefs), steps_given=True)
    assert (straight / "adapter/adapter_config.json").is_file() and (straight / "adapter/README.md").is_file()
    # as if killed between step 2's checkpoint and the end
    shutil.rmtree(killed / "checkpoints/step_000004")
    for name in ("model", "adapter"):
        shutil.rmtree(killed / name)
    (killed / "summary.json").unlink()
    (killed / "checkpoints/latest").write_text("step_000002\n")
    reference = killed / "reference.safetensors"
    stamp = os.stat(reference).st_mtime_ns
    calls = []
    original = D.reference_logps
    monkeypatch.setattr(D, "reference_logps", lambda *a: calls.append(1) or original(*a))
    r = dpo(
        tiny_model_dir,
        _cfg(killed, steps=4, ckpt_every=2, lr=1e-3),
        tune,
        ipo,
        data=str(prefs),
        resume=True,
        steps_given=True,
    )
    assert not calls and os.stat(reference).st_mtime_ns == stamp  # the cache was read, not recomputed
    a = load_file(str(straight / "checkpoints/step_000004/tuned.safetensors"))
    b = load_file(str(killed / "checkpoints/step_000004/tuned.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((straight / "summary.json").read_text())
    assert r.val == {k.removeprefix("val_"): v for k, v in summary.items() if k.startswith("val_")}
    assert torch.equal(load_file(str(straight / "reference.safetensors"))["val"], load_file(str(reference))["val"])
    with safe_open(str(reference), "pt") as f:  # a cache made under other conditions is refused, not reused
        made = {k: v for k, v in f.metadata().items() if not k.startswith("pairs_")}
    with pytest.raises(ValueError, match="holds reference log-probs of other precision"):
        D.cached_reference(None, {}, reference, made | {"precision": "bf16"}, torch.device("cpu"), "bf16", Console())
    with pytest.raises(ValueError, match="other DPO settings"):
        dpo(tiny_model_dir, _cfg(killed, steps=4), tune, DPOConfig(beta=0.1), data=str(prefs), resume=True)


# --- bad input --------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_clear_error(tiny_model_dir, prefs, tmp_path):
    good = prefs.read_text().splitlines()
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join([good[0], json.dumps({"prompt": "Hi", "chosen": "yes"}), *good[2:]]) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([good[0], good[1], '{"prompt": "Hi", "chosen": ', *good[3:]]) + "\n")
    tok = Tokenizer.load(tiny_model_dir)
    with pytest.raises(ValueError, match=r"^x.jsonl:7: missing 'rejected'"):
        pair_examples([{"prompt": "Hi", "chosen": "yes", "source": "x.jsonl:7"}], tok, 64)
    with pytest.raises(ValueError, match="'chosen' must end in an assistant turn"):
        pair_examples([{"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "no"}], tok, 64)
    with pytest.raises(ValueError, match="holds chat messages, but --format plain"):
        pair_examples(
            [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}], tok, 64, "plain"
        )
    with pytest.raises(ValueError, match="--beta must be > 0"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        DPOConfig(task="chess")
    with pytest.raises(ValueError, match="--loss-type 'hinge'"):
        DPOConfig(loss_type="hinge")
    with pytest.raises(ValueError, match="--label-smoothing applies to the sigmoid loss only"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)

    app = typer.Typer()
    app.command("dpo")(cli_verb(dpo_command))
    app.command("other")(lambda: None)  # two commands: typer keeps the verb name as a subcommand
    runner = CliRunner()
    cases = [
        (["--data", str(missing)], f"{missing}:2: missing 'rejected'"),
        (["--data", str(broken)], f"{broken}:3: not valid JSON"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--beta", "-1"], "--beta must be > 0"),
        (["--task", "chess"], "unknown task 'chess'"),
        (["--data", str(tmp_path / "nope.jsonl")], "no such file"),
    ]
    for k, (flags, needle) in enumerate(cases):
        result = runner.invoke(app, ["dpo", str(tiny_model_dir), "--out", str(tmp_path / f"o{k}"), *flags])
        assert result.exit_code == 1, (flags, result.output, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (flags, lines)
