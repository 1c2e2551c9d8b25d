"""The proposer for heads with an LM head of their own (Gemma 4 assistants, ``lm_head_source =
"draft"``): the MTP recurrence, scored against the head's embedding instead of the target's.

Each draft step runs ``MTPHead.step_states`` over the target's KV cache (read-only): the
post-projected state feeds the next step, the normed draft state ``[B, d_draft]`` is scored by
the head's own embedding ``[V, d_draft]``, fully (26B/31B assistants) or through the clustered
head (E2B/E4B: centroids pick the top clusters of ``token_ordering``; other tokens get -inf).
Only the query position of the pending token is used (constant positions), as transformers'
candidate generator does.
"""
from __future__ import annotations

import torch

from mtpspec.drafter.head import MTPHead
from mtpspec.proposers.base import Draft, DraftState
from mtpspec.sampling import logits_to_probs, sample


class OwnHeadLogits:
    """Logits of a draft state ``[B, d_draft]`` against the head's own embedding."""

    def __init__(self, head: MTPHead, kind: str | None = None):
        """kind: "clustered" or "full" (None: the head's own)."""
        cfg = head.cfg
        self.kind = kind or cfg.head
        if self.kind not in ("clustered", "full"):
            raise ValueError(f"a head's own LM head is clustered or full, not {self.kind!r}")
        self.vocab_size = cfg.vocab_size
        self.embedding = head.embedding.detach()  # [V, d_draft]
        self.centroids = head.centroids.detach()  # [C, d_draft]
        self.top = cfg.top_clusters
        self.clusters = head.token_ordering.view(cfg.num_clusters, -1)  # [C, V/C]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, d_draft] -> (logits [B, N], ids [B, N]) or (full logits [B, V], None)."""
        if self.kind != "clustered":
            return x @ self.embedding.T, None
        chosen = (x @ self.centroids.T).topk(self.top, dim=-1).indices  # [B, m]
        ids = self.clusters[chosen].flatten(1)  # [B, m*S]
        return torch.einsum("bnd,bd->bn", self.embedding[ids], x), ids

    def to_full(self, logits: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        if ids is None:
            return logits
        full = torch.full((logits.shape[0], self.vocab_size), float("-inf"))
        return full.scatter_(1, ids, logits)


class AssistantProposer:
    name = "mtp"

    def __init__(self, head: MTPHead, target):
        if head.cfg.lm_head_source != "draft":
            raise ValueError("AssistantProposer needs a head with its own LM head")
        self.head = head.eval()
        self.target = target
        self.logits = OwnHeadLogits(head)

    def reset(self) -> None:
        pass

    @torch.inference_mode()
    def propose(self, state: DraftState, k: int) -> Draft:
        cfg, batch, greedy = self.head.cfg, len(state.tokens), state.params.greedy
        positions = state.positions  # [B] position of the pending token; slots < it are valid
        end = int(positions.max())
        kv = [(state.cache.k[layer, :batch, :, :end], state.cache.v[layer, :batch, :, :end])
              for layer in cfg.target_layers]
        token = torch.tensor([t[-1] for t in state.tokens])  # [B] the pending token
        h = state.hidden[:, None]  # [B, 1, d_t]
        tokens = torch.zeros(batch, k, dtype=torch.long)
        probs = None if greedy else torch.zeros(batch, k, cfg.vocab_size)
        for i in range(k):
            query = positions if cfg.constant_positions else positions + i
            embeds = self.target.embed_tokens(token)[:, None]  # [B, 1, d_t]
            h, x = self.head.step_states(embeds, h, query[:, None], positions[:, None], kv)
            logits, ids = self.logits(x[:, 0].float())
            if greedy:
                best = logits.argmax(-1)
                token = best if ids is None else ids.gather(1, best[:, None]).squeeze(1)
            else:
                q = logits_to_probs(self.logits.to_full(logits, ids), state.params)
                probs[:, i] = q
                token = sample(q, state.generator)
            tokens[:, i] = token
        return Draft(tokens=tokens, probs=probs)
