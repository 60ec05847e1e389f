"""llama.cpp beside deepsail on the same weights: export GGUF, load it in llama.cpp, same greedy tokens? how fast?

    python benchmarks/llamacpp_bench.py                      # random-weight deepseek2, llama and qwen2 models
    python benchmarks/llamacpp_bench.py --run runs/default   # a trained deepseek-v3-style run instead
    python benchmarks/llamacpp_bench.py --rounds 7 --new-tokens 64

llama.cpp comes from llama-cpp-python, built from source once (about 17 minutes on 2 cores) into its own venv:
    ~/.cache/deepsail/llamacpp-venv     (or $DEEPSAIL_LLAMACPP_VENV); the build log is llamacpp-build.log beside it.
If `import llama_cpp` fails here, that venv's site-packages is appended to sys.path; if the venv is missing it is
created and built (`pip install llama-cpp-python==0.3.36`, CMAKE_BUILD_PARALLEL_LEVEL=2, nice 19). CI never runs
this: tests/test_gguf.py checks the files with gguf-py alone.

Per model: export f16, q8_0 and q4_0 (deepsail/export/gguf.py); load each with
`Llama(path, n_threads=2, n_ctx=..., logits_all=False, verbose=False)` and weight repacking off (llama.cpp's
`--no-repack`: llama-cpp-python 0.3.36's Llama() has no keyword for llama_model_params.use_extra_bufts, so it is
set through llama_model_default_params; repacked Q4_0/Q8_0 crashed on these VMs); then
  - tokenization: llama.cpp's tokenize of the prompts and of held-out corpus files against deepsail's encode, and
    its detokenize against deepsail's decode; the chat template as llama-cpp-python renders it;
  - greedy: 32 tokens from the same prompt ids, llama.cpp f16 against deepsail fp32 (the first divergence if any,
    the max |logit| difference at step 0, and the smallest top-1/top-2 logit gap deepsail saw, which says how
    close a tie rounding had to flip); q8_0 and q4_0 are reported beside it;
  - decode speed at 2 threads each on the same weights, one token at a time after the prompt (the first token,
    which includes the prompt, is not counted): deepsail's generate path (`deepsail.infer.generate.stream`, fp32
    and bf16, eager and with the compiled decode step of `generate --compile`) and llama.cpp (f16, q8_0, q4_0, an
    eval + argmax loop). The seven take turns every round; medians.
Random weights still give deterministic greedy tokens; the random models get a real byte-level BPE trained like
tests/conftest.py's. 2-thread decode collapses when the other core is busy: run it on a quiet machine, and read the
load averages it prints.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepsail.data import Tokenizer, default_corpus
from deepsail.export.gguf import chat_template_for_gguf, export_gguf
from deepsail.infer.generate import generate, stream
from deepsail.infer.graphs import enable_compiled_decode
from deepsail.model import ModelConfig, Transformer
from deepsail.model.presets import PRESETS
from deepsail.train.checkpoint import resolve_checkpoint
from deepsail.train.metrics import cpu_name

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VENV = Path(os.environ.get("DEEPSAIL_LLAMACPP_VENV", Path.home() / ".cache/deepsail/llamacpp-venv"))
TYPES = ("f16", "q8_0", "q4_0")
PROMPTS = ["def quicksort(xs):\n    ", "import os\nimport sys\n\n\ndef main(", "The sum of 12 and 30 is"]


# --- llama.cpp, built once -------------------------------------------------------------------------------------------
def llama_cpp_module(no_repack: bool = True) -> Any:
    try:
        import llama_cpp
    except ImportError:
        site = VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        if not (site / "llama_cpp").is_dir():
            build_llama_cpp()
        sys.path.append(str(site))  # appended: this venv's torch/numpy stay first
        import llama_cpp
    from llama_cpp import llama_cpp as C

    if no_repack and not getattr(C.llama_model_default_params, "no_repack", False):
        default = C.llama_model_default_params

        def no_repack():  # llama.cpp's --no-repack (see the module docstring)
            params = default()
            params.use_extra_bufts = False
            return params

        no_repack.no_repack = True
        C.llama_model_default_params = no_repack
    return llama_cpp


def build_llama_cpp() -> None:
    log = VENV.parent / "llamacpp-build.log"
    print(f"building {LLAMA_CPP_PYTHON} from source into {VENV} (~17 min on 2 cores; log: {log})", flush=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    with open(log, "w") as f:
        subprocess.run(
            ["nice", "-n", "19", str(VENV / "bin" / "pip"), "install", LLAMA_CPP_PYTHON, "numpy"],
            check=True,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    print(f"built in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def load_llama(llama_cpp: Any, path: Path, n_ctx: int, threads: int) -> Any:
    return llama_cpp.Llama(
        str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, logits_all=False, verbose=False
    )


def last_logits(llama_cpp: Any, llm: Any) -> np.ndarray:
    # 0.3.36's eval() keeps no logits unless logits_all: read the last position's straight from the context
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),)).copy()


def llama_greedy(llama_cpp: Any, llm: Any, ids: list[int], n: int) -> tuple[list[int], np.ndarray, list[float]]:
    """n greedy tokens after `ids`; the step-0 logits; the time each token was ready."""
    llm.reset()
    llm.eval(ids)
    first = last_logits(llama_cpp, llm)
    out, times = [int(first.argmax())], [time.perf_counter()]
    for _ in range(n - 1):
        llm.eval([out[-1]])
        out.append(int(last_logits(llama_cpp, llm).argmax()))
        times.append(time.perf_counter())
    return out, first, times


# --- deepsail --------------------------------------------------------------------------------------------------------
def deepsail_stream_times(model: Transformer, tok: Tokenizer, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    out, times = [], []
    for event in stream(model, tok, ids, max_tokens=n, temperature=0.0, ignore_eos=True):
        if event.token_id is not None:
            out.append(event.token_id)
            times.append(time.perf_counter())
    return out, times


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


# --- models ----------------------------------------------------------------------------------------------------------
def random_configs(vocab: int) -> dict[str, ModelConfig]:
    """Tiny but not trivial: 6 layers of 256, real vocab. deepseek2 gets the V3 design in full: MLA with a query
    latent, 8 routed experts top-2 in 4 groups (top 2 groups), sigmoid gating with the balancing bias, a shared
    expert, one leading dense layer, YaRN, routed scaling 2.5, and an MTP module (left out of the GGUF)."""
    mini = dict(PRESETS["deepseek-v3-mini"], vocab_size=vocab)
    yarn = dict(
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=256,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    gqa = dict(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        attention_type="gqa",
        rope_interleave=False,
        max_position_embeddings=1024,
    )
    llama3 = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    return {
        "deepseek2": ModelConfig(**mini | dict(n_group=4, topk_group=2, rope_scaling=yarn, routed_scaling_factor=2.5)),
        "llama": ModelConfig(model_type="llama", rope_theta=500000.0, rope_scaling=llama3, rms_norm_eps=1e-5, **gqa),
        "qwen2": ModelConfig(model_type="qwen2", attention_bias=True, tie_word_embeddings=True, rope_theta=1e6, **gqa),
    }


def build_random_models(root: Path, vocab: int) -> dict[str, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.train([d.text for d in default_corpus("train", max_bytes=1_000_000)], vocab_size=vocab)
    folders = {}
    for name, config in random_configs(tok.vocab_size).items():
        torch.manual_seed(0)
        model = Transformer(config)
        with torch.no_grad():  # a little life in the random router: balancing biases as training leaves them
            for module in model.modules():
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.normal_(0, 0.01)
        folders[name] = model.save_pretrained(root / name)
        tok.save(folders[name])
    return folders


# --- checks ----------------------------------------------------------------------------------------------------------
def c_detokenize(llama_cpp: Any, llm: Any, ids: list[int]) -> str:
    """llama.cpp's own llama_detokenize (llama-cpp-python's detokenize concatenates token_to_piece instead, which
    skips the clean-up of spaces that llama_detokenize applies for this pre-tokenizer)."""
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 8 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, tokens, len(ids), buf, size, False, True)
    return buf.raw[:n].decode("utf-8", "replace")


def c_pieces(llama_cpp: Any, llm: Any, ids: list[int]) -> str:
    """llama.cpp's token_to_piece per token, joined. (llama-cpp-python 0.3.36's own detokenize does this with a
    32-byte buffer and garbles any longer token: it asserts n <= 32, but a too-small buffer returns n < 0.)"""
    buf, pieces = ctypes.create_string_buffer(1024), []
    for i in ids:
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, i, buf, 1024, 0, True)
        pieces.append(buf.raw[:n])
    return b"".join(pieces).decode("utf-8", "replace")


def tokenization_check(llama_cpp: Any, llm: Any, tok: Tokenizer, texts: list[str]) -> dict[str, int]:
    """How many texts llama.cpp tokenizes to deepsail's ids, and detokenizes (both ways) to deepsail's text."""
    same = dict(texts=len(texts), ids=0, pieces=0, detokenize=0)
    for text in texts:
        ours = tok.encode(text)
        same["ids"] += ours == llm.tokenize(text.encode(), add_bos=False, special=True)
        same["pieces"] += c_pieces(llama_cpp, llm, ours) == tok.decode(ours)
        same["detokenize"] += c_detokenize(llama_cpp, llm, ours) == tok.decode(ours)
    return same


def chat_check(llama_cpp: Any, tok: Tokenizer) -> bool | None:
    if not tok.chat_template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    fmt = Jinja2ChatFormatter(chat_template_for_gguf(tok.chat_template), eos_token="<|eos|>", bos_token="<|bos|>")
    return fmt(messages=chat).prompt == tok.apply_chat_template(chat, add_generation_prompt=True)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@torch.no_grad()
def min_top2_gap(model: Transformer, ids: list[int], tokens: list[int]) -> float:
    logits = model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :].float()
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def wait_until_quiet(minutes: float, below: float = 0.5) -> None:
    deadline = time.time() + 60 * minutes
    while os.getloadavg()[0] >= below and time.time() < deadline:
        time.sleep(5)
    print(f"\ntiming at load average {load_avg()}", flush=True)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- the run ---------------------------------------------------------------------------------------------------------
def check_model(llama_cpp: Any, name: str, folder: Path, files: Path, args: argparse.Namespace) -> dict:
    folder = resolve_checkpoint(folder)
    tok = Tokenizer.load(folder)
    fp32 = Transformer.from_pretrained(folder, dtype="fp32").eval()
    bf16 = Transformer.from_pretrained(folder, dtype="bf16").eval()
    c = fp32.config
    print(
        f"\n## {name}: {c.model_type}, {c.num_hidden_layers} layers x {c.hidden_size}, vocab {c.vocab_size}, "
        f"{sum(p.numel() for n, p in fp32.named_parameters() if not n.startswith('mtp.')) / 1e6:.1f}M parameters"
        + (f" (+ {len(fp32.mtp)} MTP module(s), not exported)" if len(fp32.mtp) else ""),
        flush=True,
    )
    llms, sizes = {}, {}
    for t in TYPES:
        t0 = time.perf_counter()
        path = export_gguf(folder, files / f"{name}-{t}.gguf", t)
        sizes[t] = path.stat().st_size
        llms[t] = load_llama(llama_cpp, path, n_ctx=args.ctx, threads=args.threads)
        print(f"  {t}: {sizes[t] / 2**20:.1f} MiB, exported in {time.perf_counter() - t0:.1f}s, loaded", flush=True)

    docs = [d.text for d in default_corpus("val", max_bytes=400_000)]
    texts = PROMPTS + [d[i : i + 2000] for d in docs for i in range(0, len(d), 2000)]
    same = tokenization_check(llama_cpp, llms["f16"], tok, texts)
    n = same["texts"]
    print(
        f"  {n} texts ({sum(map(len, texts)) / 1e3:.0f} kB of held-out corpus + prompts): tokenize to deepsail's ids "
        f"{same['ids']}/{n}; token_to_piece pieces joined = deepsail's decode {same['pieces']}/{n}; "
        f"llama_detokenize = deepsail's decode {same['detokenize']}/{n}"
    )
    print(f"  chat template rendered by llama-cpp-python == deepsail's: {chat_check(llama_cpp, tok)}")

    new = args.greedy_tokens
    results: dict[str, list[tuple[int | None, float]]] = {t: [] for t in TYPES}
    gaps = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = generate(fp32, tok, ids, max_tokens=new, temperature=0.0, ignore_eos=True)[0].token_ids
        with torch.no_grad():
            ref0 = fp32(torch.tensor([ids])).logits[0, -1].float().numpy()
        gaps.append(min_top2_gap(fp32, ids, ours))
        for t in TYPES:
            theirs, first, _ = llama_greedy(llama_cpp, llms[t], ids, new)
            results[t].append((first_divergence(ours, theirs), float(np.abs(first - ref0).max() / np.ptp(ref0))))
    for t, res in results.items():
        same = sum(d is None for d, _ in res)
        divs = ", ".join(f"prompt {i} at step {d}" for i, (d, _) in enumerate(res) if d is not None)
        print(
            f"  greedy {new} tokens, llama.cpp {t} vs deepsail fp32: identical on {same}/{len(res)} prompts"
            + (f" (first divergence: {divs})" if divs else "")
            + f"; step-0 max |logit diff| / logit span <= {max(e for _, e in res):.1e}"
            + (f"; deepsail's smallest top-1/top-2 logit gap {min(gaps):.1e}" if t == "f16" else ""),
            flush=True,
        )

    # The compiled decode step (infer/graphs.py, `generate --compile`) on copies, so the eager sides stay eager.
    compiled = {}
    for dtype, m in (("fp32", fp32), ("bf16", bf16)):
        compiled["deepsail", f"{dtype} compiled"] = copy.deepcopy(m)
        enable_compiled_decode(compiled["deepsail", f"{dtype} compiled"])
    return dict(
        name=name,
        tok=tok,
        sides={("deepsail", "fp32"): fp32, ("deepsail", "bf16"): bf16}
        | compiled
        | {("llama.cpp", t): llms[t] for t in TYPES},
        sizes=sizes,
    )


def time_models(llama_cpp: Any, prepared: list[dict], args: argparse.Namespace) -> list[dict]:
    """Decode tok/s: per round, every model's five sides take turns (so a noisy spell hits all of them)."""
    rates = {(p["name"], side): [] for p in prepared for side in p["sides"]}

    def run(p: dict, side: tuple[str, str], n: int) -> list[float]:
        ids, m = p["tok"].encode(PROMPTS[0]), p["sides"][side]
        if side[0] == "deepsail":
            return deepsail_stream_times(m, p["tok"], ids, n)[1]
        return llama_greedy(llama_cpp, m, ids, n)[2]

    for p in prepared:  # warm-up (and the compiled sides' compile)
        for side in p["sides"]:
            run(p, side, 4)
    for _ in range(args.rounds):
        for p in prepared:
            for side in p["sides"]:
                rates[p["name"], side].append(decode_rate(run(p, side, args.new_tokens)))
    rows = []
    for p in prepared:
        base = statistics.median(rates[p["name"], ("deepsail", "fp32")])
        for side in p["sides"]:
            r = rates[p["name"], side]
            rows.append(
                dict(
                    model=p["name"],
                    side=side[0],
                    weights=side[1],
                    tok_s=statistics.median(r),
                    spread=(min(r), max(r)),
                    ratio=statistics.median(r) / base,
                    size=p["sizes"].get(side[1]),
                )
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a trained deepseek-v3-style run folder (or model folder) instead")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per timed decode")
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096, help="random models: tokenizer vocabulary")
    ap.add_argument("--repack", action="store_true", help="let llama.cpp repack weights (its default; off here)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many minutes for load < 0.5")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    llama_cpp = llama_cpp_module(no_repack=not args.repack)
    from importlib.metadata import version

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; threads {args.threads} each side; llama.cpp weight "
        f"repacking {'on' if args.repack else 'off'}; load average "
        f"{load_avg()} (1/5/15 min)\nllama-cpp-python {llama_cpp.__version__} (vendored llama.cpp), gguf-py "
        f"{version('gguf')}, torch {torch.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="llamacpp_bench_") as tmp:
        tmp = Path(tmp)
        models = {"run": args.run} if args.run else build_random_models(tmp / "models", args.vocab)
        prepared = [check_model(llama_cpp, name, folder, tmp, args) for name, folder in models.items()]
        wait_until_quiet(args.wait_quiet)
        rows = time_models(llama_cpp, prepared, args)

    print(f"\nload average at the end: {load_avg()}")
    print(
        f"\ndecode tok/s at {args.threads} threads, batch 1, {args.new_tokens} new tokens after a "
        f"{len(PROMPTS[0])}-character prompt, median of {args.rounds} alternating rounds (min-max)\n"
    )
    print("| model | runtime | weights | file | decode tok/s | vs deepsail fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size'] / 2**20:.1f} MiB" if r["size"] else "-"
        lo, hi = r["spread"]
        print(
            f"| {r['model']} | {r['side']} | {r['weights']} | {size} | {r['tok_s']:.0f} ({lo:.0f}-{hi:.0f}) "
            f"| {r['ratio']:.2f}x |"
        )
    # The goal: deepsail's batch-1 decode >= 0.8x llama.cpp's on the same weights and threads.
    print()
    for name in dict.fromkeys(r["model"] for r in rows):
        rate = {(r["side"], r["weights"]): r["tok_s"] for r in rows if r["model"] == name}
        f16 = rate["llama.cpp", "f16"]
        print(
            f"{name}: deepsail compiled / llama.cpp f16 = {rate['deepsail', 'fp32 compiled'] / f16:.2f}x (fp32), "
            f"{rate['deepsail', 'bf16 compiled'] / f16:.2f}x (bf16); / llama.cpp q8_0 = "
            f"{rate['deepsail', 'bf16 compiled'] / rate['llama.cpp', 'q8_0']:.2f}x (bf16)"
        )


if __name__ == "__main__":
    main()
