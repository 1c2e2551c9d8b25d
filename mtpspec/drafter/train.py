"""Retrofitting an MTP head onto a frozen target: K-step recurrent training, evaluation, checkpoints.

For a batch of target-generated sequences x [B, T], the frozen target runs once (no grad) and gives
its final hidden states h, its KV cache, and its next-token distributions. A training example is a
position P (the engine's "pending token" position): the head starts from (x_P, h_{P-1}), attends
to cache slots < P, and at unroll step i must predict the target's distribution at P+i, taking
x_{P+i} as input token (teacher forcing on tokens is exact for greedy decoding: a draft token
only matters after all earlier ones were accepted) and its own previous output as state. All P
are trained at once: the attention masks are shifted causal masks. Loss: cross-entropy against
the target's top-k probabilities (soft targets), weighted ``decay ** i``; the cluster centroids
learn, on detached states, to put the target's probability mass in the top clusters. A head with
an LM head of its own (the Gemma 4 assistant layout) is scored by its own embedding, which trains
with it; its normed draft state is what is scored, its post-projected state what recurs.

The target never changes: its weights get no gradient and the trainer checks a hash of them
before saving each checkpoint.

Resumable: ``train_state.pt`` (written atomically at each checkpoint) holds the head, the
optimizer, the step (which fixes the data position and a step-based learning-rate schedule) and the
RNG states, so a run killed at any point and started again ends with the same head as one that
never stopped; with ``max_seconds`` the schedule follows wall time and resuming is not exact.
Data parallel (``distributed.World``): each rank trains on its slice of every global batch and the
gradients are summed over ranks, which makes N ranks take the single-process step.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mtpspec.drafter import distributed
from mtpspec.drafter.checkpoint import save_drafter
from mtpspec.drafter.distributed import World
from mtpspec.drafter.head import MTPHead
from mtpspec.models.base import TargetModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8          # sequences per step
    seq_len: int = 384
    unroll: int = 4              # K recurrent steps
    decay: float = 0.8           # weight of unroll step i: decay ** i
    top_k: int = 32              # soft-target tokens per position
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    loss_chunk: int = 2048       # positions per chunk of the full-vocabulary loss
    seed: int = 0
    eval_every: int = 200
    save_every: int = 200
    device: str = "cpu"
    autocast_bf16: bool = False
    max_seconds: float | None = None  # stop (and save) after this much training time
    loss_vocab: int = 0          # 0: softmax over the whole vocabulary; N: over the batch's soft
                                 # targets plus the N most frequent tokens (CPU: ~16x cheaper)
    labels: str = "soft"         # "soft": the target's top-k distribution; "hard": its argmax


def target_fingerprint(model: TargetModel) -> str:
    """A hash of every target tensor, to prove training left the target untouched."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_buffers()) + sorted(model.named_parameters()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors too (layer scalars)
        digest.update(flat.view(torch.uint8).numpy().tobytes()
                      if tensor.dtype != torch.bfloat16 else tensor.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def pad_batch(seqs: list[list[int]], length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad / truncate to [B, T]; returns (ids, valid mask)."""
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    valid = torch.zeros(len(seqs), length, dtype=torch.bool)
    for b, seq in enumerate(seqs):
        seq = seq[:length]
        ids[b, :len(seq)] = torch.tensor(seq)
        valid[b, :len(seq)] = True
    return ids.to(device), valid.to(device)


@torch.no_grad()
def target_pass(target: TargetModel, ids: torch.Tensor, top_k: int):
    """Frozen target over [B, T]: hidden [B, T, d], cache, top-k probs/ids of each position."""
    batch, length = ids.shape
    cache = target.new_cache(batch, length)
    positions = torch.arange(length, device=ids.device).expand(batch, -1)
    _, hidden = target.forward_hidden(ids, positions, cache, num_logits=0)
    probs, tops = [], []
    for start in range(0, length, 64):
        logits = target.lm_head(hidden[:, start:start + 64]).float()  # [B, t, V]
        p, i = logits.softmax(-1).topk(top_k, dim=-1)
        probs.append(p / p.sum(-1, keepdim=True))
        tops.append(i)
    return hidden, cache, torch.cat(probs, 1), torch.cat(tops, 1)


class StoredCache:
    """The K/V of recorded ``TargetStates`` laid out like a ``KVCache`` ([layer, B, kvh, T, Dh]);
    only the layers the drafter reads are filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


def stored_pass(states: list, length: int, layers: tuple[int, ...], device):
    """``target_pass`` from recorded states: (ids, valid, hidden [B, T, d], cache, probs, tops,
    known [B, T]: positions whose distribution was recorded)."""
    batch, first = len(states), states[0]
    kvh, dh = first.keys.shape[1], first.keys.shape[3]
    k = torch.zeros(max(layers) + 1, batch, kvh, length, dh)
    v = torch.zeros_like(k)
    hidden = torch.zeros(batch, length, first.hidden.shape[1])
    probs = torch.zeros(batch, length, first.probs.shape[1])
    tops = torch.zeros(batch, length, first.tops.shape[1], dtype=torch.long)
    known = torch.zeros(batch, length, dtype=torch.bool)
    ids, valid = pad_batch([st.ids for st in states], length, "cpu")
    for b, st in enumerate(states):
        n = min(length, len(st.ids))
        stored = list(getattr(st, "layers", ()) or layers)  # older data: one entry per layer read
        for layer in set(layers):
            if layer not in stored:
                raise ValueError(f"the recorded states hold target layers {stored}, not {layer}")
            k[layer, b, :, :n] = st.keys[stored.index(layer), :, :n].float()
            v[layer, b, :, :n] = st.values[stored.index(layer), :, :n].float()
        hidden[b, :n] = st.hidden[:n].float()
        probs[b, :n], tops[b, :n] = st.probs[:n].float(), st.tops[:n].long()
        known[b, st.known_from:n] = True
    move = (lambda t: t.to(device))
    return (move(ids), move(valid), move(hidden), StoredCache(move(k), move(v)), move(probs),
            move(tops), move(known))


def unroll(head: MTPHead, target: TargetModel, ids, hidden, cache, steps: int):
    """Run the head ``steps`` times for every P in 1..T-1; yields (i, the state its LM head scores
    [B, T-1, d]: h', or for a head with its own LM head the normed draft state [B, T-1, d_draft]);
    h' always feeds the next step."""
    batch, length = ids.shape
    cfg = head.cfg
    positions = torch.arange(1, length, device=ids.device).expand(batch, -1)  # P
    kv = [(cache.k[layer, :batch], cache.v[layer, :batch]) for layer in cfg.target_layers]
    state = hidden[:, :-1]  # h_{P-1}
    for i in range(steps):
        token_pos = (positions + i).clamp(max=length - 1)
        embeds = target.embed_tokens(ids.gather(1, token_pos))  # x_{P+i}
        query = positions if cfg.constant_positions else positions + i
        state, scored = head.step_states(embeds, state, query, positions, kv)
        yield i, scored


def soft_ce(state, emb, probs, tops, weight, chunk: int):
    """Sum over rows of -sum_j p_j log q_j with q = softmax(full LM head of state); chunked."""
    flat_state = state.reshape(-1, state.shape[-1])
    flat_p, flat_i = probs.reshape(-1, probs.shape[-1]), tops.reshape(-1, tops.shape[-1])
    flat_w = weight.reshape(-1)
    total = flat_state.new_zeros(())
    keep = torch.nonzero(flat_w > 0).flatten()
    for start in range(0, len(keep), chunk):
        rows = keep[start:start + chunk]

        def piece(s, p=flat_p[rows], i=flat_i[rows], w=flat_w[rows]):
            logq = F.log_softmax((s.to(emb.dtype) @ emb.T).float(), dim=-1)
            return -(w * (p * logq.gather(1, i)).sum(-1)).sum()

        total = total + torch.utils.checkpoint.checkpoint(piece, flat_state[rows],
                                                          use_reentrant=False)
    return total


def cluster_ce(state, head: MTPHead, probs, tops, weight):
    """Centroids learn to rank the clusters holding the target's mass (states detached)."""
    cfg = head.cfg
    size = cfg.vocab_size // cfg.num_clusters
    inverse = torch.empty_like(head.token_ordering)
    inverse[head.token_ordering] = torch.arange(cfg.vocab_size, device=inverse.device)
    cluster_of = inverse[tops] // size  # [B, T, k]
    mass = torch.zeros(*probs.shape[:-1], cfg.num_clusters, device=probs.device)
    mass.scatter_add_(-1, cluster_of, probs)
    logits = state.detach().float() @ head.centroids.T  # [B, T, C]
    ce = -(mass * F.log_softmax(logits, -1)).sum(-1)
    return (ce * weight).sum()


@torch.no_grad()
def evaluate(head: MTPHead, target: TargetModel, sequences: list[list[int]], max_k: int = 6,
             seq_len: int = 384, device="cpu", head_kind: str | None = None) -> dict:
    """Greedy acceptance on held-out target-greedy sequences, with the head kind used at run time.

    For every P in the response, draft token i is accepted if it equals the target's argmax at P+i
    and all earlier drafts were accepted: exactly what greedy verification does. Returns tau for
    k = 1..max_k and per-position acceptance rates.
    """
    from mtpspec.proposers.assistant import OwnHeadLogits
    from mtpspec.proposers.mtp import DraftHeadLogits

    logits_of = (OwnHeadLogits(head, head_kind) if head.cfg.lm_head_source == "draft"
                 else DraftHeadLogits(head, target, head_kind))
    if isinstance(logits_of, DraftHeadLogits) and logits_of.kind == "clustered":
        logits_of = _DenseClustered(logits_of, target.embed.dequantized().float())
    matched_len, confidence, accepted = [], [], []  # calibration: per draft, while reachable
    for seq in sequences:
        ids, _ = pad_batch([seq], min(len(seq), seq_len), device)
        hidden, cache, _, tops = target_pass(target, ids, 1)
        greedy = tops[0, :, 0]  # target argmax at each position
        length = ids.shape[1]
        ok = torch.ones(length - 1, dtype=torch.bool, device=ids.device)
        run = torch.zeros(length - 1, dtype=torch.long, device=ids.device)
        for i, state in unroll(head, target, ids, hidden, cache, max_k):
            h = state[0]  # [T-1, d]
            draft, top = [], []
            for start in range(0, h.shape[0], 256):
                logits, idx = logits_of(h[start:start + 256])
                best = logits.argmax(-1)
                draft.append(best if idx is None else idx.gather(1, best[:, None]).squeeze(1))
                top.append(logits.float().softmax(-1).amax(-1))  # the proposer's confidence
            draft, top = torch.cat(draft), torch.cat(top)
            target_pos = torch.arange(1, length, device=ids.device) + i
            valid = target_pos < length
            want = greedy[target_pos.clamp(max=length - 1)]
            reachable = ok & valid  # the draft is verified only if every earlier one was accepted
            confidence.append(top[reachable].cpu())
            ok &= (draft == want) & valid
            accepted.append(ok[reachable].cpu())
            run += ok.long()
        # only P whose whole max_k window is inside the sequence counts
        matched_len.append(run[: max(0, length - 1 - max_k)].cpu())
    runs = torch.cat(matched_len).float()
    tau = {k: float(1 + runs.clamp(max=k).mean()) for k in range(1, max_k + 1)}
    per_pos = [float((runs > i).float().mean() / max((runs >= i).float().mean(), 1e-9))
               for i in range(max_k)]
    return {"tau": tau, "acceptance_per_position": per_pos, "positions": len(runs),
            "calibration": calibration(torch.cat(confidence), torch.cat(accepted))}


class _DenseClustered:
    """``DraftHeadLogits``' clustered head for many rows at once: one product of the states with
    the dense embedding, then the candidates' logits gathered from it (the same candidates, the
    same logits up to float summation order). Gathering every row's candidate embeddings instead
    moves rows x candidates x d floats (SmolLM2: 0.45 GB per 64 rows), which made the held-out
    evaluation cost more than training on a CPU."""

    def __init__(self, inner, embedding: torch.Tensor):
        self.inner, self.embedding = inner, embedding  # embedding [V, d]

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, d] -> (logits [N, m*S], token ids [N, m*S])."""
        chosen = (h @ self.inner.centroids.T).topk(self.inner.top, dim=-1).indices  # [N, m]
        ids = self.inner.clusters[chosen].flatten(1)  # [N, m*S]
        return (h @ self.embedding.T).gather(1, ids), ids


CALIBRATION_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001)


def calibration(confidence: torch.Tensor, accepted: torch.Tensor) -> dict:
    """Observed acceptance of a draft against the head's own confidence in it (its top
    probability), over drafts that verification would see: per confidence bin, the mean
    confidence ("predicted"), the observed acceptance rate and the count. confidence [N]: the
    top probability of each draft; accepted [N] bool. The proposer's calibrated stop
    interpolates "observed" at the bin means (``proposers.mtp.Calibration``)."""
    top, hit = confidence, accepted.float()
    bins = torch.tensor(CALIBRATION_BINS)
    which = torch.bucketize(top, bins, right=True) - 1  # [N] bin of each draft
    predicted, observed, count = [], [], []
    for b in range(len(bins) - 1):
        inside = which == b
        n = int(inside.sum())
        if n:
            predicted.append(round(float(top[inside].mean()), 4))
            observed.append(round(float(hit[inside].mean()), 4))
            count.append(n)
    return {"predicted": predicted, "observed": observed, "count": count}


def train(head: MTPHead, target: TargetModel, sequences: list[list[int]], config: TrainConfig,
          out: Path, eval_sequences: list[list[int]] | None = None, log=print,
          extra_meta: dict | None = None, state_dir: Path | None = None,
          world: World = World(), monitor=None) -> dict:
    """Train ``head`` on ``sequences`` (token ids, or ``TargetStates``; any sequence type that
    indexes), saving checkpoints in ``out``; resumable. With several ranks (``world``) each takes
    its slice of every global batch of ``config.batch_size``; only rank 0 evaluates and writes.
    ``monitor`` (``drafter.monitor.Monitor``) gets each step's and evaluation's numbers."""
    device = torch.device(config.device)
    if config.batch_size % world.size:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the "
                         f"{world.size} ranks")
    if not world.is_main:
        log = _silent
    torch.manual_seed(config.seed)
    head.to(device).train()
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    fingerprint = target_fingerprint(target)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.95))
    state_path = (state_dir or out) / "train_state.pt"
    step, history, seen = 0, [], 0  # seen: training tokens (target positions with a label)
    if state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=True)  # nothing unpickled
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history, seen = saved["step"], saved["history"], saved.get("tokens", 0)
        if "rng" in saved:  # older states have none (the loop draws no random numbers today)
            _set_rng(saved["rng"])
        log(f"resumed from step {step}")
    order = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(sequences), generator=order).tolist()
    cursor = (step * config.batch_size) % max(1, len(perm))
    weights = torch.tensor([config.decay ** i for i in range(config.unroll)])
    started, running, running_acc = time.time(), None, None
    own_head = head.cfg.lm_head_source == "draft"  # an LM head of its own, trained with it
    stored = bool(sequences) and not isinstance(sequences[0], list)  # TargetStates
    frozen = None if own_head else target.embed.dequantized()  # [V, d] the frozen tied head
    if config.autocast_bf16 and frozen is not None:
        frozen = frozen.to(torch.bfloat16)
    if monitor is not None:
        monitor.start_training(step, config.steps)
    while step < config.steps:
        # ranks must agree on the time: it ends the run and, with max_seconds, sets the schedule
        elapsed = distributed.from_main(time.time() - started, world, device)
        if config.max_seconds is not None and elapsed > config.max_seconds:
            config = replace(config, steps=step)  # out of time: save this step as the last
            if step % config.save_every and world.is_main:
                _save(head, optimizer, target, fingerprint, config, history, out, step,
                      extra_meta, state_path, seen)
            break
        # the global batch; this rank reads its slice, padded to the global batch's length
        picks = [perm[(cursor + j) % len(perm)] for j in range(config.batch_size)]
        cursor = (cursor + config.batch_size) % len(perm)
        length = min(config.seq_len, max(_length(sequences, i) for i in picks))
        batch = [sequences[i] for i in distributed.rank_slice(picks, world)]
        if stored:  # the target's states were kept when it wrote the responses
            ids, valid, hidden, cache, probs, tops, known = stored_pass(
                batch, length, head.cfg.target_layers, device)
        else:
            ids, valid = pad_batch(batch, length, device)
            hidden, cache, probs, tops = target_pass(target, ids, config.top_k)
            known = valid
        if config.labels == "hard":  # one-hot on the target's argmax (tops are sorted by prob)
            probs = torch.zeros_like(probs)
            probs[..., 0] = 1.0
        progress = step / max(1, config.steps)
        if config.max_seconds:
            progress = max(progress, elapsed / config.max_seconds)
        lr = config.lr * min(1.0, (step + 1) / config.warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, count, agree = 0.0, 0, []
        emb = head.embedding if own_head else frozen  # [V, d_scored]
        if config.loss_vocab:  # sampled softmax: these tokens only, the soft targets among them
            vocab = torch.unique(torch.cat([head.frequent_tokens[:config.loss_vocab].to(device),
                                            tops.flatten()]))  # [S] sorted
            emb, emb_tops = emb[vocab], torch.searchsorted(vocab, tops)  # tops as rows of emb
        else:
            emb_tops = tops
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
            for i, state in unroll(head, target, ids, hidden, cache, config.unroll):
                where = torch.arange(1, ids.shape[1], device=device) + i  # target position P+i
                ok = valid[:, 1:] & (where < ids.shape[1]) & known.gather(
                    1, where.clamp(max=ids.shape[1] - 1).expand(ids.shape[0], -1))
                w = ok.float() * float(weights[i])
                at = where.clamp(max=ids.shape[1] - 1)
                p = probs[:, at]  # [B, T-1, k]
                t, t_emb = tops[:, at], emb_tops[:, at]
                loss = loss + soft_ce(state, emb, p, t_emb, w, config.loss_chunk)
                loss = loss + 0.1 * cluster_ce(state, head, p, t, w)
                count += int(ok.sum())
                if i == 0:  # every rank scores its share of the global batch
                    seen += int(ok.sum()) * world.size
                if i == 0:  # running acceptance estimate: top-1 agreement among the target's top-k
                    with torch.no_grad():
                        cand = emb[t_emb[:, :64]]  # [B, <=64, k, d]
                        pick = torch.einsum("btkd,btd->btk", cand.float(),
                                            state[:, :64].float()).argmax(-1)
                        sub = ok[:, :64]
                        agree.append(float(((pick == 0) & sub).sum()) / max(1, int(sub.sum())))
        # the loss over the global batch's scored positions: summed gradients are its gradient
        loss = loss / max(1, distributed.sum_over_ranks(count, world, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(head, world)
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = distributed.sum_over_ranks(float(loss.detach()), world, device)
        agreement = distributed.sum_over_ranks(agree[0], world, device) / world.size
        tokens = distributed.sum_over_ranks(int(valid.sum()), world, device)  # in the global batch
        running = value if running is None else 0.95 * running + 0.05 * value
        accept = agreement if running_acc is None else 0.95 * running_acc + 0.05 * agreement
        running_acc = accept
        if monitor is not None:  # collectives stay outside: ranks may differ in monitors
            monitor.training_step(step, value, accept, lr, tokens)
        if step % 10 == 0 or step == config.steps:
            rate = step / max(1e-9, time.time() - started)
            log(f"step {step}/{config.steps} loss {running:.4f} accept@1~{accept:.3f} "
                f"lr {lr:.2e} {rate:.2f} it/s")
        if eval_sequences and (step % config.eval_every == 0 or step == config.steps):
            if world.is_main:
                head.eval()
                result = evaluate(head, target, eval_sequences, device=device)
                head.train()
                history.append({"step": step, "tokens": seen, "seconds": time.time() - started,
                                "loss": running, **result})
                log(f"eval step {step}: tau@k {json.dumps({k: round(v, 3) for k, v in result['tau'].items()})}"
                    f" per-position {[round(x, 3) for x in result['acceptance_per_position']]}")
                if monitor is not None:
                    monitor.evaluation(step, result)
            distributed.barrier(world)
        if (step % config.save_every == 0 or step == config.steps) and world.is_main:
            _save(head, optimizer, target, fingerprint, config, history, out, step, extra_meta,
                  state_path, seen)
    if monitor is not None:
        monitor.end_training()
    return {"steps": step, "history": history, "seconds": time.time() - started}


def _silent(*_args) -> None:
    pass


def _length(sequences, index: int) -> int:
    """Length of one training sequence without reading more than needed (``lengths``: a stored
    dataset's length column)."""
    lengths = getattr(sequences, "lengths", None)
    return int(lengths[index]) if lengths is not None else len(sequences[index])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _save(head, optimizer, target, fingerprint, config, history, out, step, extra_meta,
          state_path, seen=0) -> None:
    if target_fingerprint(target) != fingerprint:
        raise RuntimeError("the target's weights changed during training")
    meta = {"train": asdict(config), "history": history, **(extra_meta or {})}
    if history and history[-1].get("step") == step and "calibration" in history[-1]:
        meta["calibration"] = history[-1]["calibration"]  # for the proposer's calibrated stop
    save_drafter(head, out, meta)
    # written whole or not at all: a run killed mid-write resumes from the previous state
    partial = state_path.with_name(state_path.name + ".partial")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "history": history, "rng": _rng_state(), "tokens": seen}, partial)
    os.replace(partial, state_path)
