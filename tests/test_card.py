"""The model card: front matter the hub can parse, the numbers a reader needs, and no way for outside text to change
its structure. (That the verbs write one is asserted in their own tests: test_run, test_finetune, test_quantize,
test_export.)"""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from deepsail.card import invocation, write_model_card
from deepsail.model import Transformer
from deepsail.model.hf import read_config

HOSTILE = 'x"\n---\nlicense: evil\n# injected | col |\n```\n\x7f\u2028'


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("\n---\n", 1)[0].removeprefix("---\n"))


def test_card_of_a_tiny_model(tiny_model_dir, tmp_path):
    config = read_config(tiny_model_dir)
    path = write_model_card(
        tmp_path,
        config=config,
        title="tiny",
        base_model="runs/base",
        data=["the embedded corpus"],
        training={"lr": 1e-3, "steps": 10},
        metrics={"val_bpb": 2.345678, "tokens": 123456},
        how_made="deepsail run --out runs/tiny",
    )
    card = path.read_text()
    assert path == tmp_path / "README.md"
    front = _front(card)
    assert front["library_name"] == "deepsail" and front["base_model"] == "runs/base"
    assert front["pipeline_tag"] == "text-generation" and front["license"] == "other"
    assert {"deepsail", "deepseek-style", "moe", "mla"} <= set(front["tags"])
    total = Transformer(config).num_params()
    assert f"({total:,})" in card and "active per token" in card  # the parameter count, MoE's active share
    assert "| val_bpb | 2.346 |" in card and "| tokens | 123,456 |" in card
    assert "ds.from_pretrained(" in card and "AutoModelForCausalLM" in card and "deepsail run --out runs/tiny" in card
    sections = re.findall(r"^## (.+)$", card, re.M)
    assert sections == [
        "Model",
        "Training data",
        "Training config",
        "Evaluation",
        "Intended use and limitations",
        "How to load",
        "How it was made",
    ]


def test_hostile_text_cannot_change_the_cards_structure(tiny_model_dir, tmp_path):
    config = read_config(tiny_model_dir)
    card = write_model_card(
        tmp_path,
        config=config,
        title=HOSTILE,
        base_model=HOSTILE,
        data=[HOSTILE],
        metrics={HOSTILE: 1.0},
        how_made=HOSTILE,
        tags=[HOSTILE],
    ).read_text()
    front = _front(card)
    assert front["base_model"] == HOSTILE and HOSTILE in front["tags"] and front["license"] == "other"
    assert set(front) == {"library_name", "license", "pipeline_tag", "base_model", "tags"}
    lines = card.splitlines()
    made = lines.index("## How it was made")
    assert "license: evil" not in lines[:made] and "# injected | col |" not in lines[:made]
    assert card.endswith(f"## How it was made\n\n````bash\n{HOSTILE}\n````\n")  # verbatim, inside a longer fence
    titles = [line for line in lines[:made] if line.startswith("# ")]
    assert titles == [lines[lines.index("---", 1) + 2]] and "injected" in titles[0]  # the one title, one line
    assert len(re.findall(r"^## ", card, re.M)) == 6  # no section added (no training config given)
    metric_row = next(line for line in lines if "injected" in line and line.startswith("| x"))
    assert len(re.findall(r"(?<!\\)\|", metric_row)) == 3  # still two cells


def test_adapter_and_quantized_cards_and_license_carried_over(tiny_model_dir, tmp_path):
    config = read_config(tiny_model_dir)
    base = tmp_path / "base"
    write_model_card(base, config=config, title="base", license="mit")
    adapter = write_model_card(tmp_path / "adapter", config=config, title="a", base_model=str(base), kind="adapter")
    front = _front(adapter.read_text())
    assert front["library_name"] == "peft" and front["license"] == "mit" and "lora" in front["tags"]
    assert "PeftModel.from_pretrained" in adapter.read_text()
    qc = {"quant_method": "deepsail", "method": "int4", "group_size": 32, "modules_not_converted": ["lm_head"]}
    quantized = write_model_card(tmp_path / "q", config=config, title="q", quantization=qc).read_text()
    assert {"quantized", "int4"} <= set(_front(quantized)["tags"]) and "transformers does not" in quantized
    assert "AutoModelForCausalLM" not in quantized
    with pytest.raises(ValueError, match="kind"):
        write_model_card(tmp_path / "z", config=config, title="z", kind="dataset")


def test_how_made_is_the_command_line_when_run_as_deepsail(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/deepsail", "quantize", "my model", "--out", "q"])
    assert invocation("fallback") == "deepsail quantize 'my model' --out q"
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])
    assert invocation("deepsail quantize m --out q") == "deepsail quantize m --out q"
