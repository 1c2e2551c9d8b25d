"""Vocabulary layouts for the drafter's LM head: balanced k-means clusters and a frequent subset.

``balanced_kmeans`` permutes the vocabulary into C clusters of exactly V/C tokens each, grouping
tokens whose (tied) embedding rows are close, so that a centroid's score approximates the logits
of its members. The frequency layout keeps the N tokens the target emits most often.
"""
from __future__ import annotations

import numpy as np
import torch


def balanced_kmeans(rows: torch.Tensor, num_clusters: int, iters: int = 6, seed: int = 0,
                    chunk: int = 16_384) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [V, d] -> (token_ordering [V] int64, centroids [C, d] float32). V % C must be 0."""
    vocab, _ = rows.shape
    if vocab % num_clusters:
        raise ValueError(f"vocabulary {vocab} is not a multiple of {num_clusters} clusters")
    size = vocab // num_clusters
    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    centroids = unit[torch.randperm(vocab, generator=gen)[:num_clusters].to(rows.device)].clone()
    for _ in range(iters):
        assign = torch.cat([(unit[i:i + chunk] @ centroids.T).argmax(-1)
                            for i in range(0, vocab, chunk)])
        sums = torch.zeros_like(centroids).index_add_(0, assign, unit)
        counts = torch.bincount(assign, minlength=num_clusters).clamp(min=1)
        centroids = torch.nn.functional.normalize(sums / counts[:, None], dim=-1)
    # balance: each token takes its best cluster among its top candidates that still has room,
    # most confident tokens first; leftovers fill the remaining slots
    top = min(8, num_clusters)
    best_scores, best = [], []
    for i in range(0, vocab, chunk):
        s, c = (unit[i:i + chunk] @ centroids.T).topk(top, dim=-1)
        best_scores.append(s.cpu())
        best.append(c.cpu())
    scores, cands = torch.cat(best_scores).numpy(), torch.cat(best).numpy()
    room = np.full(num_clusters, size)
    assign = np.full(vocab, -1)
    for token in np.argsort(-scores[:, 0]):
        for cluster in cands[token]:
            if room[cluster]:
                room[cluster] -= 1
                assign[token] = cluster
                break
    free = np.repeat(np.arange(num_clusters), room)
    assign[assign < 0] = free
    ordering = torch.from_numpy(np.argsort(assign, kind="stable")).long()
    raw = rows.float().cpu()[ordering].view(num_clusters, size, -1).mean(1)  # [C, d] mean rows
    return ordering, raw


def frequent_tokens(token_lists, vocab: int, count: int) -> torch.Tensor:
    """The ``count`` most frequent ids in ``token_lists`` (ties by id), as int64 [count]."""
    counts = np.zeros(vocab, dtype=np.int64)
    for tokens in token_lists:
        np.add.at(counts, np.asarray(tokens, dtype=np.int64), 1)
    order = np.lexsort((np.arange(vocab), -counts))[:count]
    return torch.from_numpy(np.sort(order)).long()
