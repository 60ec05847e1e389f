"""Self-speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) head: the model drafts for itself.

One round, for a row whose main-model cache holds tokens 0..n-1 and whose next token t_n is already chosen:

1. Draft. The MTP module at position i reads (h_i, Emb(t_{i+1})) and predicts t_{i+2}. It first catches up over
   the positions the main model verified last round (true hidden states h_i), and its last output drafts
   d_1 ≈ t_{n+1}. For d_2..d_k we reuse the same depth-1 module on its own output: the hidden state it produced
   at position n-1 stands in for the main model's h_n, which does not exist yet. DeepSeek-V3 chains depth-2 on
   depth-1 states in exactly this way during training, so the stand-in is the natural one; a depth-1 module was
   never trained to consume its own states, so acceptance falls with every extra draft — k = 1 or 2 is what pays.
   The entries these recursive calls write to the MTP's KV layer are built from stand-ins, so the MTP's `lens`
   is rolled back afterwards and the next catch-up overwrites them with the real thing.
2. Verify. One main-model forward over [t_n, d_1, ..., d_k] gives its greedy choice a_1..a_{k+1} at every
   position. The longest prefix with d_j == a_j (m tokens) is accepted, and a_{m+1} comes free: every round
   emits m + 1 tokens for one main forward.
3. Roll back. The main cache keeps t_n, d_1..d_m (`lens = n + 1 + m`); the rejected drafts' entries stay in
   the pool but lie past `lens`, so nothing reads them and the next round overwrites them.

Only greedy decoding is verified (accept iff the draft equals the argmax), so the output is token-for-token the
plain greedy output; sampling would need rejection sampling against the draft distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepsail.infer.batching import model_device, pad_rows
from deepsail.infer.sampling import DecodeState
from deepsail.model import KVCache, Transformer


@torch.inference_mode()
def speculative_decode(
    model: Transformer, rows: Sequence[Sequence[int]], states: list[DecodeState], num_draft: int
) -> tuple[list[int], list[int]]:
    """Greedy-decode every row into its state; returns per-row (drafted, accepted) token counts."""
    if len(model.mtp) == 0:
        raise ValueError(
            "speculative decoding drafts with the model's MTP head, and this model has none "
            "(num_nextn_predict_layers=0); use a DeepSeek-V3-style model trained with MTP, or speculative=0"
        )
    bad = [
        s.params
        for s in states
        if not s.params.greedy or s.params.repetition_penalty != 1.0 or s.params.logprobs is not None
    ]
    if bad:
        raise ValueError(
            "speculative decoding verifies greedy choices only: use temperature=0, no "
            "repetition_penalty and no logprobs (or speculative=0)"
        )
    B, k = len(rows), num_draft
    device = model_device(model)
    ar = torch.arange(B, device=device)
    max_new = max(s.params.max_tokens for s in states)
    cache = model.new_cache(B, max(len(r) for r in rows) + max_new + k + 1)
    mtp_cache = KVCache(cache.pool, cache.block_table, torch.zeros_like(cache.lens))  # same blocks, own lens

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
        logits_m, h_m = model.mtp_step(0, hidden, nxt, cache=mtp_cache, input_lens=feed)
        last = (feed - 1).clamp(min=0)
        drafts = [logits_m[ar, last].argmax(-1)]
        g = h_m[ar, last][:, None]
        valid = mtp_cache.lens.clone()
        for _ in range(k - 1):
            logits_m, g = model.mtp_step(0, g, drafts[-1][:, None], cache=mtp_cache, input_lens=one)
            drafts.append(logits_m[:, 0].argmax(-1))
        mtp_cache.lens.copy_(valid)
        D = torch.stack(drafts, 1)  # [B, k]

        # 2. verify all k drafts (and get one more token) with one main forward
        before = cache.lens.clone()
        out = model(torch.cat((current[:, None], D), 1), cache=cache, input_lens=(k + 1) * one, return_hidden=True)
        target = out.logits.argmax(-1)  # [B, k+1]: the main model's greedy token after each input position
        m = (D == target[:, :k]).long().cumprod(1).sum(1)  # accepted drafts per row

        # 3. emit d_1..d_m, a_{m+1}; stop rules may end a row part-way
        D_l, t_l, m_l, alive_l = D.tolist(), target.tolist(), m.tolist(), alive.tolist()
        for b in range(B):
            if not alive_l[b]:
                continue
            drafted[b] += k
            accepted[b] += m_l[b]
            for tok in D_l[b][: m_l[b]] + [t_l[b][m_l[b]]]:
                states[b].append(tok)
                if states[b].done:
                    break

        # 4. roll back the main cache to the accepted tokens; next catch-up covers positions n..n+m
        cache.lens.copy_(before + (1 + m) * one)
        current = target.gather(1, m[:, None]).squeeze(1)
        nxt = torch.cat((D, torch.zeros_like(D[:, :1])), 1).scatter_(1, m[:, None], current[:, None])
        hidden = out.hidden
        alive = torch.tensor([not s.done for s in states], device=device)
        feed = (m + 1) * alive
    return drafted, accepted
