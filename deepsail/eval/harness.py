"""lm-eval-harness's model class for deepsail: every request runs on the continuous-batching engine `serve` uses.

    from deepsail.eval.harness import DeepsailLM
    lm = DeepsailLM("runs/default")                   # any folder ds.from_pretrained / `deepsail serve` reads
    lm_eval.simple_evaluate(model=lm, tasks=["deepsail_arithmetic"], task_manager=task_manager())

or `lm_eval --model deepsail --model_args pretrained=DIR` once this module is imported (`deepsail eval` does both).

How each request type maps onto the engine:
- `loglikelihood(context, continuation)`: one engine request per pair whose prompt is context + continuation,
  scored by the engine's prompt log-probabilities (`SamplingParams.prompt_logprobs`, the path behind
  `/v1/completions` with `echo` + `logprobs`) with the top-1 token, so "is the continuation greedy" comes from the
  same pass. The engine packs many requests into each forward (chunked prefill, no padding waste beyond a step),
  so nothing is scored one sequence at a time.
- `loglikelihood_rolling(text)`: lm-eval's own rolling windows (`get_rolling_token_windows`, the same split its
  `hf` backend makes), each window scored as above and summed per document.
- `generate_until(context, gen_kwargs)`: one greedy (or sampled, seeded) engine request each, stopped by `until`
  strings and EOS.

Tokenization follows lm-eval's `hf` backend exactly (the whole context + continuation is encoded, then split where
the context's own encoding ends; an empty context is the BOS token, else EOS), which is why the scores agree with
that backend run on the same weights through transformers (tests/test_eval.py: within 1e-4).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deepsail.infer.engine import Engine, EngineConfig, RequestHandle
from deepsail.infer.sampling import SamplingParams

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the task YAMLs over embedded data


@register_model("deepsail")
class DeepsailLM(TemplateLM):
    """A deepsail model (run folder, HF folder, quantized folder, fine-tuning checkpoint) as an lm-eval `LM`."""

    def __init__(
        self,
        pretrained: str | Path,
        adapter: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 32,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        max_num_batched_tokens: int = 2048,
        seed: int = 1234,
        progress: bool = True,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args for deepsail: {sorted(unknown)}; known: pretrained, adapter, device, dtype, "
                "batch_size, max_length, max_gen_toks, max_num_batched_tokens, seed"
            )
        from deepsail.infer.generate import load
        from deepsail.train.checkpoint import resolve_checkpoint

        folder = resolve_checkpoint(pretrained)
        self.model, self.tokenizer = load(folder, device=device, dtype=dtype)
        if self.tokenizer is None:
            raise ValueError(f"{folder} has no tokenizer.json; lm-eval needs the tokenizer the model was trained with")
        if adapter is not None:
            from deepsail.tune.lora import load_adapter

            load_adapter(self.model, adapter)
        self.name = str(pretrained)
        # lm-eval passes "auto" or "auto:N" for its own batch-size search; the engine sizes its batches itself
        # under max_num_batched_tokens, so that means "the default".
        rows = int(batch_size) if str(batch_size).isdigit() else 32
        rows = min(rows, max_batch_size or rows)
        if rows < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.engine = Engine(
            self.model,
            self.tokenizer,
            EngineConfig(
                max_batch_size=rows,
                max_num_batched_tokens=max(max_num_batched_tokens, rows),
                enable_prefix_caching=True,
            ),
        )
        # A scored prompt is the window plus the one token it predicts last, and the engine samples one token
        # after it: two positions beyond the window must fit the model's context.
        limit = self.engine.max_model_len - 2
        if max_length is not None and not 1 <= int(max_length) <= limit:
            raise ValueError(f"max_length must be between 1 and {limit} for this model, got {max_length}")
        self._max_length = int(max_length) if max_length is not None else limit
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.progress = progress
        self._device = self.engine.device

    # --- what TemplateLM needs --------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        if eos is None:
            raise ValueError("this tokenizer has no EOS token; lm-eval needs one to end documents")
        return eos

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's hf backend: an empty context is conditioned on BOS, or EOS when there is none.
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # deepsail prompts carry no special tokens (the server feeds text the same way), so neither does this.
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # --- scoring ----------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding would produce it) per request."""
        jobs, conts = [], []
        for _key, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval asked to score an empty continuation")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens cannot be scored in a {self.max_length}-token "
                    "window; raise max_length or shorten the task's targets"
                )
            # The window ends at the continuation's last token: at most max_length tokens of input before it.
            window = (context + continuation)[-(self.max_length + 1) :]
            jobs.append((window, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)))
            conts.append(len(continuation))
        out = []
        for (window, _), n, handle in zip(jobs, conts, self._run(jobs, "loglikelihood", disable_tqdm)):
            scored = handle.prompt_logprobs
            logprob, greedy = 0.0, True
            for pos in range(len(window) - n, len(window)):
                lp, top = scored[pos]
                logprob += lp
                greedy = greedy and top[0][0] == window[pos]
            out.append((logprob, greedy))
            self.cache_hook.add_partial("loglikelihood", None, (logprob, greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods over lm-eval's disjoint rolling windows of `max_length` tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(((text, ""), context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        return totals

    # --- generation -------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for k, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            top_p = float(kwargs.pop("top_p", 1.0))
            top_k = int(kwargs.pop("top_k", 0) or 0)
            if kwargs:
                raise ValueError(f"unsupported generation_kwargs for deepsail: {sorted(kwargs)}")
            if not sample:
                temperature = 0.0
            room = self.engine.max_model_len
            max_gen = max(1, min(max_gen, room - 1))
            # As the hf backend: keep the context's last tokens so that the generation fits the context.
            ids = self.tok_encode(context)[-(room - max_gen) :] or [self.prefix_token_id]
            params = SamplingParams(
                max_tokens=max_gen,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                stop=tuple(s for s in until if s),
                seed=self.seed + k,
            )
            jobs.append((ids, params))
        out = []
        for (context, gen_kwargs), handle in zip(
            (r.args for r in requests), self._run(jobs, "generate_until", disable_tqdm)
        ):
            text = handle.result()[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    # --- driving the engine -----------------------------------------------------------------------------------------
    def _run(self, jobs: list[tuple[list[int], SamplingParams]], what: str, quiet: bool = False) -> list[RequestHandle]:
        """Run every job on the engine in this thread and return their finished handles, in job order.

        Longest prompts go in first (a step's rows are padded to its longest row, so similar lengths share steps),
        and only as many are queued as the engine takes in at once (its queue is bounded)."""
        engine = self.engine
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        handles: list[RequestHandle | None] = [None] * len(jobs)
        window = engine.config.max_batch_size + engine.config.max_waiting // 2
        inflight: list[int] = []
        nxt = done = 0
        bar = Progress(
            TextColumn(f"[bold]{what}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tok_s]:,.0f} prompt tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=quiet or not self.progress,
        )
        started, fed = time.perf_counter(), 0
        with bar:
            task = bar.add_task(what, total=len(jobs), tok_s=0.0)
            while done < len(jobs):
                while nxt < len(order) and len(inflight) < window:
                    i = order[nxt]
                    handles[i] = engine.submit(*jobs[i])
                    inflight.append(i)
                    nxt += 1
                if not engine.step():
                    raise RuntimeError("the engine went idle with requests unfinished")  # an invariant, not input
                still = [i for i in inflight if not handles[i].done]
                fed += sum(len(jobs[i][0]) for i in inflight if handles[i].done)
                done += len(inflight) - len(still)
                inflight = still
                bar.update(task, completed=done, tok_s=fed / (time.perf_counter() - started))
        return handles  # type: ignore[return-value]


def task_manager(include_path: Sequence[str | Path] = (), defaults: bool = False) -> Any:
    """lm-eval's TaskManager over deepsail's embedded tasks and the user's own task folders; with `defaults`, also
    lm-eval's thousands of bundled task configs (indexing them takes ~13 s on 2 cores, so only when asked for)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path)], include_defaults=defaults)
