"""Exports against the runtimes that load them: a torch.export program run by a process that cannot import
deepsail, an ONNX graph generating in onnxruntime alone, a sharded HF checkpoint that transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deepsail as ds
from deepsail.cli import app
from deepsail.model import ModelConfig, Transformer

runner = CliRunner()


def _model(preset: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset)).eval()


def _ok(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def _error(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    line = result.stderr.strip()
    assert line.startswith("error:") and "Traceback" not in line, line
    for needle in needles:
        assert needle in line, line
    return line


# --- ds.compile and the torch.export program ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def program(tmp_path_factory) -> tuple[Transformer, Path]:
    """The seed document's snippet, as written (deepseek -> deepsail), on a small model."""
    model = ds.Transformer(layers=2, heads=4)
    path = tmp_path_factory.mktemp("pt2") / "optimized_model.ds"
    compiled = ds.compile(model, input_shape=(128, 512), optimize_for="inference")
    compiled.save(path)
    return model, path


def test_compiled_forward_matches_eager():
    torch.manual_seed(0)  # one dense block and one MoE block (its expert loop runs between compiled graphs)
    model = Transformer(
        ModelConfig.preset("deepseek-v3-debug").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    )
    compiled = ds.compile(model, input_shape=(2, 24), optimize_for="inference")
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        eager = model(ids).logits
    torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-5, rtol=1e-5)


def test_saved_program_runs_without_deepsail(program, tmp_path):
    model, path = program
    shapes = {"one": (1, 1), "odd": (3, 7), "long": (2, 40)}
    g = torch.Generator().manual_seed(1)
    inputs = {k: torch.randint(0, model.config.vocab_size, s, generator=g) for k, s in shapes.items()}
    save_file(inputs, str(tmp_path / "in.safetensors"))
    script = (
        "import sys; sys.modules['deepsail'] = None\n"  # deepsail cannot be imported in this process
        "import torch; from safetensors.torch import load_file, save_file\n"
        "m = torch.export.load(sys.argv[1]).module()\n"
        "save_file({k: m(v) for k, v in load_file(sys.argv[2]).items()}, sys.argv[3])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        for k, ids in inputs.items():
            torch.testing.assert_close(outputs[k], model(ids).logits, atol=1e-5, rtol=1e-5)
    loaded = ds.load(path)
    assert loaded.deepsail_meta["format"] == "deepsail.export/1"
    assert loaded.deepsail_meta["config"]["num_hidden_layers"] == 2


def test_ds_load_refuses_what_is_not_a_program(program, tmp_path):
    _, path = program
    with pytest.raises(ValueError, match="not a file"):
        ds.load(tmp_path / "missing.ds")
    (tmp_path / "text.ds").write_text("hello")
    with pytest.raises(ValueError, match="not a torch.export program"):
        ds.load(tmp_path / "text.ds")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "a zip, not a program")
    with pytest.raises(ValueError, match="not a readable torch.export program"):
        ds.load(tmp_path / "other.zip")
    # An archive whose weights say "unpickle me" is refused before torch.export.load would run the pickle.
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "pickled.ds", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(name, data)
    with pytest.raises(ValueError, match="never unpickles"):
        ds.load(tmp_path / "pickled.ds")
    with pytest.raises(ValueError, match="optimize_for"):
        ds.compile(_model("deepseek-v3-debug"), optimize_for="speed")
    with pytest.raises(ValueError, match="input_shape"):
        ds.compile(_model("deepseek-v3-debug"), input_shape=(0, 8))


def test_a_crashed_save_leaves_no_file(tmp_path, monkeypatch):
    model = _model("deepseek-v3-debug")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", crash)
    with pytest.raises(OSError):
        ds.compile(model).save(tmp_path / "m.ds")
    assert list(tmp_path.iterdir()) == []


def test_compiled_training_step_matches_eager():
    model = _model("llama-3-8b-debug")  # dense: one graph, forward and backward
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    model(ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = ds.compile(model, input_shape=(2, 16), optimize_for="training")
    compiled(ids, labels=ids).loss.backward()
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in model.parameters()}


# --- ONNX ------------------------------------------------------------------------------------------------------------
def _deepsail_greedy(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding with deepsail's paged cache: the tokens and each step's last-position logits."""
    cache = model.new_cache(1, len(prompt) + steps)
    tokens, logits = [], []
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            last = model(ids, cache=cache).logits[0, -1]
            logits.append(last.numpy())
            tokens.append(int(last.argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens, logits


@pytest.mark.parametrize("arch", ["deepseek-v3", "qwen2"])
def test_onnx_generates_like_deepsail(arch, tiny_model_dir, tmp_path, monkeypatch):
    from deepsail.export import onnx as onnx_export
    from deepsail.export.onnx import OnnxGenerator

    out = tmp_path / "m.onnx"
    if arch == "deepseek-v3":  # the verb on a model folder: MLA latent past, MoE
        model = ds.from_pretrained(tiny_model_dir).eval()
        _ok(runner.invoke(app, ["export", "onnx", str(tiny_model_dir), "--out", str(out)]))
        assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    else:  # GQA past; and the >2 GiB layout (weights in m.onnx.data beside the graph), forced by a zero limit
        model = _model("qwen2-1.5b-debug").train()
        monkeypatch.setattr(onnx_export, "ONNX_LIMIT", 0)
        onnx_export.export_onnx(model, out)
        assert model.training  # the caller's model is left as it was
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
        model.eval()
        with pytest.raises(ValueError, match="fp32"):
            onnx_export.export_onnx(_model("qwen2-1.5b-debug").bfloat16(), tmp_path / "bf16.onnx")
    generator = OnnxGenerator(out)
    prompts = [[5, 17, 42, 7, 99, 3], [11, 12, 13]]  # different lengths: the short one is left-padded
    steps = 9  # prefill + 8 decode steps
    tokens = generator.generate(prompts, steps)
    for b, prompt in enumerate(prompts):
        want_tokens, want_logits = _deepsail_greedy(model, prompt, steps)
        assert tokens[b] == want_tokens
        diff = max(float(np.abs(generator.step_logits[s][b] - want_logits[s]).max()) for s in range(steps))
        assert diff <= 1e-4, diff


def test_onnx_errors(tmp_path):
    from deepsail.export.onnx import OnnxGenerator

    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type for an unparsable file
        OnnxGenerator(tmp_path / "x.onnx")
    _error(runner.invoke(app, ["export", "onnx", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.onnx")]))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "option, field",
    [
        (dict(sparse_attention="hybrid", sliding_window=3, compress_block=2, select_block=4), "sparse_attention"),
        (dict(mod_capacity=0.5), "mod_capacity"),
    ],
)
def test_exports_name_an_option_torch_export_cannot_trace(option, field, tmp_path):
    """Data-dependent sizes (hybrid attention's selection, Mixture-of-Depths routing): both torch.export-based
    formats refuse up front, naming the field, where the exporter would stop on a data-dependent guard."""
    from deepsail.export.onnx import export_onnx

    model = Transformer(ModelConfig.preset("deepseek-v3-debug").replace(**option)).eval()
    for export in (lambda: export_onnx(model, tmp_path / "m.onnx"), lambda: ds.compile(model).save(tmp_path / "m.ds")):
        with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
            export()
    assert not list(tmp_path.iterdir())


# --- HF, sharded -----------------------------------------------------------------------------------------------------
def test_hf_export_sharded_loads_in_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    _ok(runner.invoke(app, ["export", "hf", str(tiny_model_dir), "--out", str(out), "--max-shard-size", "300KB"]))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).stat().st_size <= 300_000 + 70_000 for s in shards)  # one tensor over
    assert (out / "tokenizer.json").is_file() and f'base_model: "{tiny_model_dir}"' in (out / "README.md").read_text()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = ds.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    _error(runner.invoke(app, ["export", "hf", str(tiny_model_dir), "--out", str(out), "--max-shard-size", "2 pails"]))
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "x", max_shard_size=0)


def test_exports_refuse_a_quantized_model(tiny_model_dir, tmp_path):
    _ok(runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", "int8", "--out", str(tmp_path / "q")]))
    for verb, out in (("onnx", "m.onnx"), ("pt2", "m.ds"), ("hf", "hf"), ("gguf", "m.gguf")):
        _error(runner.invoke(app, ["export", verb, str(tmp_path / "q"), "--out", str(tmp_path / out)]), "quantized")
        assert not (tmp_path / out).exists()
