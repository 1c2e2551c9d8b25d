"""A separate, smaller draft model with its own KV cache (llama.cpp's ``-md``, HF's assistant_model).

The classic baseline the MTP head must beat: it needs its own prefill and cache. Its cache is kept
in step with the engine by comparing the histories: whatever it processed beyond the common prefix
with the new history (rejected drafts) is rolled back by moving its lengths, then the new tokens
are fed in one pass and k tokens are drafted one at a time.
"""
from __future__ import annotations

import torch

from mtpspec.models.base import TargetModel
from mtpspec.proposers.base import Draft, DraftState
from mtpspec.sampling import logits_to_probs, sample


class DraftModelProposer:
    name = "draft-model"

    def __init__(self, model: TargetModel, max_len: int = 4096):
        self.model = model
        self.max_len = max_len
        self.cache = None
        self.processed: list[list[int]] = []  # tokens whose K/V are in the draft cache, per row

    def reset(self) -> None:
        self.cache = None
        self.processed = []

    @property
    def cache_nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def _sync(self, histories: list[list[int]]) -> torch.Tensor:
        """Feed each row's unprocessed tokens; return final-position logits [B, V]."""
        batch = len(histories)
        if self.cache is None:
            self.cache = self.model.new_cache(batch, self.max_len)
            self.processed = [[] for _ in range(batch)]
        starts = []
        for b, tokens in enumerate(histories):
            done = self.processed[b]
            common = 0
            limit = min(len(done), len(tokens) - 1)  # always re-feed at least the last token
            while common < limit and done[common] == tokens[common]:
                common += 1
            starts.append(common)
        width = max(len(t) - s for t, s in zip(histories, starts))
        ids = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        for b, (tokens, start) in enumerate(zip(histories, starts)):
            new = tokens[start:]
            ids[b, :len(new)] = torch.tensor(new)
            # right-padding: pad slots lie past this row's length and are overwritten later
            positions[b] = start + torch.arange(width)
            last[b] = len(new) - 1
            self.processed[b] = list(tokens)
        self.cache.check_room(int(positions.max()) + 1)
        _, hidden = self.model(ids, positions, self.cache, num_logits=0)
        final = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        return self.model.lm_head(final)  # [B, V]

    def propose(self, state: DraftState, k: int) -> Draft:
        params, batch = state.params, len(state.tokens)
        logits = self._sync(state.tokens)
        tokens = torch.zeros(batch, k, dtype=torch.long)
        probs = None if params.greedy else torch.zeros(batch, k, logits.shape[-1])
        positions = torch.tensor([len(t) for t in state.tokens])
        for i in range(k):
            if params.greedy:
                tokens[:, i] = logits.argmax(-1)
            else:
                q = logits_to_probs(logits, params)
                probs[:, i] = q
                tokens[:, i] = sample(q, state.generator)
            if i + 1 < k:
                self.cache.check_room(int(positions.max()) + 1)
                logits, _ = self.model(tokens[:, i:i + 1], positions[:, None] + i, self.cache)
                logits = logits[:, -1]
                for b in range(batch):
                    self.processed[b].append(int(tokens[b, i]))
        return Draft(tokens=tokens, probs=probs)
