"""Self-speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) head: the model drafts for itself.

One round, for a row whose main-model cache holds tokens 0..n-1 and whose next token t_n is already chosen:

1. Draft. The MTP module at position i reads (h_i, Emb(t_{i+1})) and predicts t_{i+2}. It first catches up over
   the positions the main model verified last round (true hidden states h_i), and its last output drafts
   d_1 ≈ t_{n+1}. For d_2..d_k we reuse the same depth-1 module on its own output: the hidden state it produced
   at position n-1 stands in for the main model's h_n, which does not exist yet. DeepSeek-V3 chains depth-2 on
   depth-1 states in exactly this way during training, so the stand-in is the natural one; a depth-1 module was
   never trained to consume its own states, so acceptance falls with every extra draft — k = 1 or 2 is what pays.
   The entries these recursive calls write to the MTP's KV layer are built from stand-ins, so the MTP's `lens`
   is rolled back afterwards and the next catch-up overwrites them with the real thing. Each draft d_j is drawn
   from q_j, the MTP's distribution after the request's own sampling transforms (one-hot at the argmax if greedy).
2. Verify. One main-model forward over [t_n, d_1, ..., d_k] gives the target distribution p_j at every position.
   `accept` is the standard rejection sampling of speculative decoding (Leviathan et al. 2023, Chen et al. 2023):
   d_j is kept with probability min(1, p_j(d_j) / q_j(d_j)) while every earlier one was kept; at the first rejection
   the replacement is drawn from max(0, p_j - q_j) renormalised, and if all k are kept a bonus token comes from
   p_{k+1}. Every emitted token is then distributed exactly as plain sampling from p would give it. For greedy
   rows p and q are one-hot, so this is "keep while d_j == argmax p_j, then that argmax": the output is
   token-for-token the plain greedy output. Every round emits m + 1 tokens for one main forward.
3. Roll back. The main cache keeps t_n, d_1..d_m (`lens = n + 1 + m`); the rejected drafts' entries stay in
   the pool but lie past `lens`, so nothing reads them and the next round overwrites them.

`speculative_decode` runs rounds for a static batch (`generate(..., speculative=k)`, greedy only); the
continuous-batching engine (`EngineConfig.speculative`) runs the same pieces — `mtp_catch_up`, `draft`, `accept` —
inside its steps, for greedy and sampled requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepsail.infer.batching import model_device, pad_rows
from deepsail.infer.graphs import compiled_hidden
from deepsail.infer.sampling import DecodeState, probs_of, sample_from_probs
from deepsail.model import KVCache, Transformer


def check_mtp(model: Transformer) -> None:
    if len(model.mtp) == 0:
        raise ValueError(
            "speculative decoding drafts with the model's MTP head, and this model has none "
            "(num_nextn_predict_layers=0); use a DeepSeek-V3-style model trained with MTP, or speculative=0"
        )


def mtp_catch_up(
    model: Transformer, hidden_BTD: torch.Tensor, next_BT: torch.Tensor, cache: KVCache, lens_B: torch.Tensor
) -> torch.Tensor:
    """The MTP module over row b's first lens_B[b] positions: (main hidden h_i, token t_{i+1}) -> its own hidden
    states [B, T, D], written to its KV layer at cache.lens (advanced). No head: callers take logits only where they
    draft (`mtp_logits`), not over a whole prefill chunk."""
    step = getattr(model, "compiled_decode", None)  # infer/graphs.py, where enabled: the same numbers, one graph
    h = step.mtp(hidden_BTD, next_BT, cache, lens_B) if step is not None else None
    if h is None:
        B, T = next_BT.shape
        ctx = model.attention_context(B, T, hidden_BTD.device, cache, lens_B)
        h = model.mtp[0](hidden_BTD, model.embed_tokens(next_BT), ctx)
    cache.lens += lens_B
    return h


def mtp_logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.mtp[0].norm(h))


def draw(probs_BV: torch.Tensor, states: Sequence[DecodeState]) -> torch.Tensor:
    """One token per row from `probs_BV`, with the row's own generator (greedy rows are one-hot: no draw needed)."""
    u = [torch.rand((), generator=s.generator) if s.generator is not None else torch.zeros(()) for s in states]
    return sample_from_probs(probs_BV, torch.stack(u).to(probs_BV.device))


def draft(
    model: Transformer,
    h_BD: torch.Tensor,
    logits_BV: torch.Tensor,
    cache: KVCache,
    k_B: torch.Tensor,
    states: Sequence[DecodeState],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts d_1..d_k per row and the distributions q they were drawn from: ([B, k], [B, k, V], q zero past row b's
    own k_B[b]). `h_BD` / `logits_BV` are the MTP's state and logits at each row's last caught-up position; the
    recursive calls write the MTP's KV layer past cache.lens, which is restored afterwards."""
    k = int(k_B.max())
    params = [s.params for s in states]
    q = [probs_of(logits_BV, params)]
    d = [draw(q[0], states)]
    g = h_BD[:, None]
    valid = cache.lens.clone()
    for j in range(1, k):
        live = (k_B > j).long()
        g = mtp_catch_up(model, g, d[-1][:, None], cache, live)
        q.append(probs_of(mtp_logits(model, g[:, 0]), params) * live[:, None])
        d.append(draw(q[-1], states))
    cache.lens.copy_(valid)
    return torch.stack(d, 1), torch.stack(q, 1)


def accept(
    p_BKV: torch.Tensor, q_BkV: torch.Tensor, d_Bk: torch.Tensor, k_B: torch.Tensor, u_BK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling (module docstring, step 2) for a batch of rows with k_B[b] <= k drafts each.

    p_BKV [B, k+1, V]: the target distributions after each fed token (position k_B[b] is row b's bonus); q_BkV
    [B, k, V], d_Bk [B, k]: drafts and the distributions they came from (zero past k_B[b]); u_BK [B, k+1]: uniforms
    (zeros for greedy rows). Returns (m [B]: drafts kept, next [B]: the token drawn after them)."""
    B, K, V = p_BKV.shape
    k = K - 1
    p_d = p_BKV[:, :k].gather(2, d_Bk[..., None]).squeeze(2)
    q_d = q_BkV.gather(2, d_Bk[..., None]).squeeze(2)
    ratio = torch.where(torch.arange(k, device=p_d.device) < k_B[:, None], p_d / q_d.clamp_min(1e-30), 0.0)
    m = (u_BK[:, :k] < ratio).long().cumprod(1).sum(1)  # greedy: u = 0 < 1 iff the draft is the argmax
    q_pad = torch.cat((q_BkV, torch.zeros_like(q_BkV[:, :1])), 1)  # past the drafts, q = 0: the residual is p
    at = m[:, None, None].expand(B, 1, V)
    residual = (p_BKV.gather(1, at) - q_pad.gather(1, at)).squeeze(1).clamp_min(0)
    return m, sample_from_probs(residual, u_BK[:, k])


def uniforms(states: Sequence[DecodeState], n: int) -> torch.Tensor:
    """[B, n] uniforms, each row from its own generator (zeros for greedy rows, which need none)."""
    return torch.stack(
        [torch.rand(n, generator=s.generator) if s.generator is not None else torch.zeros(n) for s in states]
    )


@torch.inference_mode()
def speculative_decode(
    model: Transformer, rows: Sequence[Sequence[int]], states: list[DecodeState], num_draft: int
) -> tuple[list[int], list[int]]:
    """Greedy-decode every row into its state; returns per-row (drafted, accepted) token counts."""
    check_mtp(model)
    bad = [
        s.params
        for s in states
        if not s.params.greedy
        or s.params.repetition_penalty != 1.0
        or s.params.logprobs is not None
        or s.grammar is not None
    ]
    if bad:
        raise ValueError(
            "speculative decoding in generate() verifies greedy choices only: use temperature=0, no "
            "repetition_penalty, logprobs or json_schema (or speculative=0); the serving engine's "
            "speculation also samples"
        )
    B, k = len(rows), num_draft
    device = model_device(model)
    ar = torch.arange(B, device=device)
    max_new = max(s.params.max_tokens for s in states)
    cache = model.new_cache(B, max(len(r) for r in rows) + max_new + k + 1)
    mtp_cache = KVCache(cache.pool, cache.block_table, torch.zeros_like(cache.lens))  # same blocks, own lens
    k_B = torch.full((B,), k, device=device)

    ids, lens = pad_rows(rows, device)
    out = model(ids, cache=cache, input_lens=lens, last_logits_only=True, return_hidden=True)
    current = out.logits[:, 0].argmax(-1)  # t_n
    for b, tok in enumerate(current.tolist()):
        states[b].append(tok)
    # The MTP catch-up input: (h_i, t_{i+1}) for i = 0..n-1 — the prompt shifted by one, then t_n.
    hidden, nxt = out.hidden, torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    nxt[ar, lens - 1] = current
    alive = torch.tensor([not s.done for s in states], device=device)
    feed = lens * alive
    drafted, accepted = [0] * B, [0] * B

    while bool(alive.any()):
        one = alive.long()
        # 1. draft (rows already finished carry garbage that is never used)
        h_m = mtp_catch_up(model, hidden, nxt, mtp_cache, feed)
        last = h_m[ar, (feed - 1).clamp(min=0)]
        D, Q = draft(model, last, mtp_logits(model, last), mtp_cache, k_B, states)

        # 2. verify all k drafts (and get one more token) with one main forward
        before = cache.lens.clone()
        fed, fed_lens = torch.cat((current[:, None], D), 1), (k + 1) * one
        hidden = compiled_hidden(model, fed, cache, fed_lens)
        if hidden is not None:
            logits = model.logits_of(hidden)
        else:
            out = model(fed, cache=cache, input_lens=fed_lens, return_hidden=True)
            hidden, logits = out.hidden, out.logits
        P = probs_of(logits.flatten(0, 1), [s.params for s in states for _ in range(k + 1)]).view(B, k + 1, -1)
        m, current = accept(P, Q, D, k_B, torch.zeros(B, k + 1, device=device))

        # 3. emit d_1..d_m, then the token after them; stop rules may end a row part-way
        D_l, c_l, m_l, alive_l = D.tolist(), current.tolist(), m.tolist(), alive.tolist()
        for b in range(B):
            if not alive_l[b]:
                continue
            drafted[b] += k
            accepted[b] += m_l[b]
            for tok in D_l[b][: m_l[b]] + [c_l[b]]:
                states[b].append(tok)
                if states[b].done:
                    break

        # 4. roll back the main cache to the accepted tokens; next catch-up covers positions n..n+m
        cache.lens.copy_(before + (1 + m) * one)
        nxt = torch.cat((D, torch.zeros_like(D[:, :1])), 1).scatter_(1, m[:, None], current[:, None])
        alive = torch.tensor([not s.done for s in states], device=device)
        feed = (m + 1) * alive
    return drafted, accepted
