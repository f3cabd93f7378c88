"""Alignment loops on the reference GPT with a verifiable task (``tasks.AdditionTask``):
supervised fine-tuning, DPO on honestly sampled preference pairs, GRPO, a reward model and PPO.

    python -m fastattn.train sft  --init out/pretrain --out out/sft  --max-steps 300
    python -m fastattn.train dpo  --init out/sft      --out out/dpo  --max-steps 100
    python -m fastattn.train grpo --init out/sft      --out out/grpo --max-steps 50
    python -m fastattn.train rm   --init out/sft      --out out/rm   --max-steps 100
    python -m fastattn.train ppo  --init out/sft --reward-model out/rm --out out/ppo

Each stage loads ``INIT/ckpt.pt`` (a pretraining checkpoint or an earlier stage's), rebuilds the
same tokenizer from the corpus recorded in it, and writes ``OUT/summary.json`` (the pretraining
keys plus ``eval_accuracy``: greedy exact match on held-out prompts), ``OUT/log.jsonl`` and
``OUT/ckpt.pt`` (same format as pretraining, written atomically by ``save_checkpoint``).

Log-probs. A sequence is prompt + completion, and only completion tokens (the answer and its
end-of-text token) count: ``mask[b, t]`` is 1 where target ``ids[b, t + 1]`` is a completion
token, and only those slots' hidden states go through the LM head, on both backends. On the
fastattn backend the sequences are packed with no padding (``GPT.packed_hidden_states``, which
attends with ``fastattn.varlen_attention``), a prompt that several sequences share (a DPO pair,
a GRPO group) going through the model once (``SharedPrefixes``,
``GPT.shared_prefix_hidden_states``), and the log-probs come from
``fastattn.linear_token_logprobs`` (the tokens x vocab logits are never held); on the torch
backend the batch is right-padded with the end-of-text token (causal attention: padding after a
sequence cannot change it) and the log-probs come from log_softmax + gather over ``F.linear``.
``Batch`` holds both layouts; ``completion_logprobs`` returns (B, T-1) either way.

Phases. Every step times its phases (generation, old / reference / policy log-probs,
backward, optimizer) with ``Phases``: ``log.jsonl`` has them per step (``phase_s``) and
``summary.json`` their totals (``phase_time_s``). ``fastattn-train bench --stage dpo|grpo``
runs the same step functions on both backends side by side (``align_bench.py``).

Losses (per-token log-probs l_t, completion mask m_t, |o| = sum_t m_t):
    SFT   -sum_{b,t} m l / sum_{b,t} m                          (mean over answer tokens)
    DPO   -log sigmoid(beta [(L_c - L_c^ref) - (L_r - L_r^ref)]),  L = sum_t m l
          (Rafailov et al. 2023); L^ref from the frozen initial (SFT) model, computed once
          for all pairs up front (or per batch with ``--ref-on-the-fly``);
          ``--rpo-alpha`` a adds a x (SFT loss on the chosen completions) (RPO: Pang et al.
          2024 found plain DPO lowers the chosen log-probs too on reasoning tasks)
    GRPO  A_i = (r_i - mean_g r) / (std_g r + 1e-4) within a prompt's group of G samples,
          rho_t = exp(l_t - l_t^old),
          J_i = (1/|o_i|) sum_t m_t [min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta k3_t],
          k3_t = exp(l^ref_t - l_t) - (l^ref_t - l_t) - 1  (Schulman's unbiased, >= 0 KL
          estimator), loss = -mean_i J_i (Shao et al. 2024); ``--ppo-epochs`` updates per batch
          of samples, so from the second on rho != 1 and the clip acts; l^old is the first
          update's own forward, detached (the policy has not moved yet: no extra forward).
    RM    -log sigmoid(r_c - r_r), r = w . h + b + a * (mean log-prob of the completion under
          the RM's own LM head), h the final hidden state of the last answer token, on the SFT
          trunk (``RewardHead``; a starts at 1: on the demo's pairs that feature alone ranks
          68% of the held-out pairs right, where a head on the end-of-text token's hidden
          state alone reached 53-58%); pairs from
          ``build_pairs`` (``--pairing``), the pairs of ``--holdout`` of the prompts held out
          (summary ``pair_accuracy``;
          ``train_pair_accuracy`` on the rest). The checkpoint stores the head as
          ``reward_head`` next to ``model``; rm writes no eval_accuracy but judges K samples
          of the SFT policy per held-out problem (``rm_best_of_k``: the accuracy of its pick
          against a random sample's, the best case for a policy optimised against it).
    PPO   r_t = -beta (l_t - l^ref_t) + R at the last completion slot, R the RM's score, or,
          for a completion that is not a number closed by end-of-text (``tasks.well_formed``: a
          format check, like TRL's missing-EOS penalty), the batch's lowest RM score of an
          answer less ``--format-penalty`` (``format_floor``; without it the policy learned to
          answer nothing, which the RM, which saw few empty answers, scored highest); GAE;
          ``ppo_loss``: clipped policy loss + vf_coef x clipped value loss, value head
          (``value_head`` in the checkpoint) on the policy's trunk. Logs ``rm_reward`` and the
          verifier's ``verifier_reward`` each step (a widening gap is reward hacking).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import tasks
from .pretrain import (_RESUME_WARNS, CKPT_FORMAT, CKPT_NAME, CheckpointError,
                       TrainingInterrupted, _autocast, _json_args, _rng_state, _seed_all,
                       _StopOnSignals, adopt_checkpoint_options, check_out_dir,
                       check_resume_args, checkpoint_fingerprint, clear_out_dir, closing_phase,
                       load_checkpoint, lr_at, open_run_log, peak_memory_bytes, resolve_device,
                       restore_rng_state, resume_start, run_summary, save_checkpoint,
                       signal_name)

STAGES = ("sft", "dpo", "grpo", "rm", "ppo")
HEAD_KEYS = {"rm": "reward_head", "ppo": "value_head"}    # checkpoint key of the scalar head
PAD_MULTIPLE = 8


# --------------------------------------------------------------------------------------------
# Log-probs and losses


@dataclasses.dataclass
class Batch:
    """One step's sequences (prompt + completion, token ids), in both layouts the backends use.

    ``ids`` (B, T) right-padded with the end-of-text token (T rounded up to ``PAD_MULTIPLE``),
    ``mask`` (B, T-1) float, 1 where target ``ids[b, t+1]`` is a completion token; ``rows``,
    ``cols`` (M,) those completion slots and ``targets`` (M,) their target ids; ``flat``
    (total,), ``cu_seqlens`` int32 (B+1,) and ``max_len``: the same sequences packed back to
    back with no padding."""
    seqs: list
    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    flat: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    shared: Optional["SharedPrefixes"] = None

    @property
    def padded_tokens(self) -> int:
        return self.ids.numel()

    @property
    def tokens(self) -> int:
        """The sequences' tokens (a prompt shared by several counts once per sequence, as on
        the torch backend, although ``shared`` runs it once)."""
        return self.flat.numel()


@dataclasses.dataclass
class SharedPrefixes:
    """The batch with each distinct prompt computed once (``GPT.shared_prefix_hidden_states``):
    the distinct prompts, then every sequence's completion, as packed segments; a completion
    attends to its prompt's tokens and its own. ``prefix_at`` / ``suffix_at`` (B,): where
    sequence b's prompt / completion starts in the packed tokens; ``starts`` (B,) its prompt
    length."""
    ids: torch.Tensor
    cu_seqlens: torch.Tensor
    kv_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    prefix_at: torch.Tensor
    suffix_at: torch.Tensor
    starts: torch.Tensor
    max_seqlen: int = 0
    max_seqlen_k: int = 0

    def index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Packed index of token ``cols[m]`` of sequence ``rows[m]``."""
        st = self.starts[rows]
        return torch.where(cols < st, self.prefix_at[rows] + cols,
                           self.suffix_at[rows] + cols - st)

    @staticmethod
    def build(seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> Optional["SharedPrefixes"]:
        """None when no two sequences share a prompt (nothing to save) or a prompt or a
        completion is empty."""
        first: dict = {}
        for s, st in zip(seqs, starts):
            if not 1 <= st < len(s):
                return None
            first.setdefault(tuple(s[:st]), len(first))
        if len(first) == len(seqs):
            return None
        ids, cu_q, prefix_start = [], [0], []
        for pre in first:                       # dicts keep insertion order
            prefix_start.append(len(ids))
            ids += pre
            cu_q.append(len(ids))
        kv, cu_k = [], [0]
        for at, pre in zip(prefix_start, first):
            kv += range(at, at + len(pre))
            cu_k.append(len(kv))
        prefix_at, suffix_at = [], []
        for s, st in zip(seqs, starts):
            at = prefix_start[first[tuple(s[:st])]]
            prefix_at.append(at)
            suffix_at.append(len(ids))
            kv += range(at, at + st)
            kv += range(len(ids), len(ids) + len(s) - st)
            cu_k.append(len(kv))
            ids += s[st:]
            cu_q.append(len(ids))
        i32, i64 = torch.int32, torch.long
        return SharedPrefixes(torch.tensor(ids, dtype=i64), torch.tensor(cu_q, dtype=i32), torch.tensor(kv, dtype=i64),
                              torch.tensor(cu_k, dtype=i32), torch.tensor(prefix_at, dtype=i64),
                              torch.tensor(suffix_at, dtype=i64),
                              torch.tensor(list(starts), dtype=i64),
                              max(b - a for a, b in zip(cu_q, cu_q[1:])),
                              max(b - a for a, b in zip(cu_k, cu_k[1:])))

    def to(self, device) -> "SharedPrefixes":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def make_batch(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int, device,
               multiple: int = 1) -> Batch:
    ids, mask = pad_batch(seqs, starts, pad_id, "cpu", multiple)
    rows, cols = mask.nonzero(as_tuple=True)
    lengths = [len(s) for s in seqs]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    on = (ids, mask, rows, cols, ids[rows, cols + 1], flat, torch.tensor(cu, dtype=torch.int32))
    shared = SharedPrefixes.build(seqs, starts)
    return Batch([list(s) for s in seqs], *(t.to(device) for t in on), max(lengths),
                 None if shared is None else shared.to(device))


def hidden_at(model, batch: Batch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(M, d_model) final hidden states of tokens ``(rows[m], cols[m])`` of ``batch``.

    fastattn backend: the sequences packed with no padding (``GPT.packed_hidden_states``, i.e.
    ``varlen_attention``); torch backend: the right-padded batch (plain PyTorch's way).
    Causal attention makes both equal: padding after a sequence never reaches its tokens.
    (varlen_attention has no dropout: a model training with attention dropout stays padded.)"""
    if model.backend == "fastattn" and not (model.training and model.config.dropout > 0):
        if batch.shared is not None:
            sh = batch.shared
            h = model.shared_prefix_hidden_states(sh.ids, sh.cu_seqlens, sh.kv_index,
                                                  sh.cu_seqlens_k, sh.max_seqlen,
                                                  sh.max_seqlen_k)
            return h[sh.index(rows, cols)]
        h = model.packed_hidden_states(batch.flat, batch.cu_seqlens, batch.max_len)
        return h[batch.cu_seqlens[rows].long() + cols]
    return model.hidden_states(batch.ids)[rows, cols]


def lm_logprobs(model, h: torch.Tensor, target: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """(M,) log p(target | hidden h (M, d)) under the LM head, the logits divided by
    ``temperature``, at least fp32. fastattn: ``linear_token_logprobs`` (never holds the
    M x vocab logits); torch: log_softmax + gather over ``F.linear``."""
    if model.backend == "fastattn":
        import fastattn
        return fastattn.linear_token_logprobs(h, model.lm_head.weight, target,
                                              temperature=temperature)
    logits = F.linear(h, model.lm_head.weight)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _scatter(batch: Batch, values: torch.Tensor) -> torch.Tensor:
    out = values.new_zeros(batch.mask.shape)
    return out.index_put((batch.rows, batch.cols), values)


def completion_logprobs(model, batch: Batch, value_head=None, temperature: float = 1.0):
    """(B, T-1) log-probs of the completion targets (0 elsewhere, like ``batch.mask``). Only the
    completion slots go through the LM head, on both backends. With ``value_head``, also
    returns the (B, T-1) values ``value_head(h)`` at the same slots (PPO). ``temperature``: of
    the distribution the completions were sampled from (GRPO, PPO: the policy whose ratio and
    KL the losses measure is the one that sampled, as in TRL and OpenRLHF)."""
    h = hidden_at(model, batch, batch.rows, batch.cols)
    logp = _scatter(batch, lm_logprobs(model, h, batch.targets, temperature))
    if value_head is None:
        return logp
    return logp, _scatter(batch, value_head(h).squeeze(-1).float())


def sequence_logprobs(model, batch: Batch) -> torch.Tensor:
    """(B,) sum of each sequence's completion log-probs."""
    return completion_logprobs(model, batch).sum(dim=-1)


class Phases:
    """Wall time (and, with ``memory``, peak memory) of the named phases of a step:
    ``with phases("backward"): ...``. Time: the device is synchronised at both ends. Memory: the
    peak above the memory in use when the phase starts; CUDA ``max_memory_allocated``, CPU the
    process's resident-set high-water mark (reset through ``/proc/self/clear_refs``)."""

    def __init__(self, device: torch.device, memory: bool = False):
        self.device, self.memory = device, memory
        self.times: dict = {}
        self.peaks: dict = {}
        self._high = 0      # absolute high-water mark across resets (see high_water_mark)

    def high_water_mark(self) -> int:
        """The highest memory in use since this object was made: each phase resets the device's
        peak counter, so the peak since the last reset alone would miss earlier phases."""
        self._high = max(self._high, peak_memory_bytes(self.device))
        return self._high

    def restart_high_water_mark(self) -> None:
        """Start the high-water mark afresh from the memory in use now (a benchmark's timed
        steps apart from its warm-up's one-time memory: autotuning, caches)."""
        from .pretrain import restart_peak
        restart_peak(self.device)
        self._high = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        from .pretrain import _reset_cpu_peak, _sync
        _sync(self.device)
        base = None
        if self.memory:
            self.high_water_mark()
            if self.device.type == "cuda":
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                base = _reset_cpu_peak()
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"phase:{name}"):
            yield
        _sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        if base is not None:
            peak = peak_memory_bytes(self.device) - base
            self.peaks[name] = max(self.peaks.get(name, 0), peak)
            self.high_water_mark()

    def reset(self) -> None:
        self.times, self.peaks = {}, {}


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -(logp * mask).sum() / mask.sum().clamp_min(1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4,
                     scale: bool = True) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: each reward less its group's mean, divided by the
    group's standard deviation when ``scale`` (GRPO; ``scale=False`` is Dr. GRPO's unscaled
    advantage, Liu et al. 2025: a group whose rewards differ only by partial credit then moves
    the policy as little as that difference, not as much as a right answer among wrong ones)."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


def _clip_active(ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """1 where the clipped surrogate is the one min() takes (its gradient is then 0: ratio past
    1 + eps with a positive advantage, below 1 - eps with a negative one), else 0; TRL's
    clipfrac."""
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    return (clipped < ratio * adv).float()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              adv: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
              beta: float = 0.04) -> tuple[torch.Tensor, dict]:
    """logp, old_logp, ref_logp, mask (N, T); adv (N,). Returns the loss and statistics."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(-1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    n = mask.sum(dim=-1).clamp_min(1)
    per_seq = ((surrogate - beta * kl) * mask).sum(dim=-1) / n
    loss = -per_seq.mean()
    with torch.no_grad():
        total = mask.sum().clamp_min(1)
        stats = {"kl": float((kl * mask).sum() / total),
                 "clip_frac": float((_clip_active(ratio, a, clip_eps) * mask).sum() / total)}
    return loss, stats


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       center: float = 0.0) -> torch.Tensor:
    """Reward-model loss -mean log sigmoid(r_c - r_r); d/dr_c = -sigmoid(r_r - r_c) / N. With
    ``center`` > 0, plus center * mean (r_c + r_r)^2 (Eisenstein et al. 2023, TRL's
    center_rewards_coefficient): the pairwise loss fixes only differences within a prompt, and
    this pulls every prompt's scores to zero mean, so that a consumer seeing one completion per
    prompt (PPO) is not handed an arbitrary per-prompt offset."""
    if not (math.isfinite(center) and center >= 0):
        raise ValueError(f"bradley_terry_loss: center must be a finite number >= 0, got "
                         f"{center}")
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center:
        loss = loss + center * (r_chosen + r_rejected).pow(2).mean()
    return loss


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (N, T) token slots; ``mask`` marks the completion
    (contiguous), and the step after its last slot is terminal (value 0). Returns advantages and
    returns (advantage + value), both 0 outside the mask.
        delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t,   A_t = delta_t + gamma lam m_{t+1} A_{t+1}"""
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    nxt_a = torch.zeros_like(rewards[..., 0])
    nxt_v = torch.zeros_like(rewards[..., 0])
    nxt_m = torch.zeros_like(rewards[..., 0])
    for t in range(T - 1, -1, -1):
        delta = rewards[..., t] + gamma * nxt_m * nxt_v - values[..., t]
        a = (delta + gamma * lam * nxt_m * nxt_a) * mask[..., t]
        adv[..., t] = a
        nxt_a, nxt_v, nxt_m = a, values[..., t], mask[..., t]
    return adv, (adv + values) * mask


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
             mask: torch.Tensor, clip_eps: float = 0.2, value_clip: float = 0.2,
             vf_coef: float = 0.5) -> tuple[torch.Tensor, dict]:
    """All (N, T); means over the masked tokens of the batch.
        policy  -min(rho A, clip(rho, 1-eps, 1+eps) A),  rho = exp(l - l_old)
        value   0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
        loss    policy + vf_coef value"""
    total = mask.sum().clamp_min(1)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    pg = -(surrogate * mask).sum() / total
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    vf = 0.5 * (torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
                * mask).sum() / total
    with torch.no_grad():
        stats = {"pg_loss": float(pg), "vf_loss": float(vf),
                 "clip_frac": float((_clip_active(ratio, adv, clip_eps) * mask).sum() / total),
                 "vf_clip_frac": float((((values - old_values).abs() > value_clip).float()
                                        * mask).sum() / total)}
    return pg + vf_coef * vf, stats


# --------------------------------------------------------------------------------------------
# Batches and sampling


def pad_batch(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
              device, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the completion mask (B, T-1) over targets: token j of
    sequence b (j >= starts[b]) is target position j - 1. T is rounded up to ``multiple``:
    the loops pass 8, so a run sees few distinct shapes (the fastattn CPU/Triton kernels are
    specialised per shape, and each new one costs a build on first use)."""
    T = max(len(s) for s in seqs)
    T = -(-T // multiple) * multiple
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for b, (s, st) in enumerate(zip(seqs, starts)):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, st - 1:len(s) - 1] = 1.0
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_ids(model, prompts: Sequence[Sequence[int]], n: int, *, temperature: float,
               max_new: int, eos: int, generator: Optional[torch.Generator], batch: int = 256
               ) -> list[list[list[int]]]:
    """``n`` completions per prompt (token ids, cut after the first ``eos``, which is kept).
    Prompts of one length are generated together (``GPT.generate`` takes no padding)."""
    device = next(model.parameters()).device
    out: list[list[list[int]]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for length in sorted(groups):
        rows = [i for i in groups[length] for _ in range(n)]
        for lo in range(0, len(rows), batch):
            chunk = rows[lo:lo + batch]
            idx = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long,
                               device=device)
            gen = model.generate(idx, max_new, temperature=temperature, generator=generator)
            for i, row in zip(chunk, gen[:, length:].tolist()):
                if eos in row:
                    row = row[:row.index(eos) + 1]
                out[i].append(row)
    return out


def sample(model, corpus, problems: Sequence[tasks.Problem], n: int, *, temperature: float,
           max_new: int, generator: Optional[torch.Generator], batch: int = 256
           ) -> list[list[list[int]]]:
    """``sample_ids`` for task problems."""
    return sample_ids(model, [tasks.encode(corpus, p.prompt) for p in problems], n,
                      temperature=temperature, max_new=max_new, eos=corpus.eos_id,
                      generator=generator, batch=batch)


def evaluate(model, corpus, task: tasks.AdditionTask) -> dict:
    """Greedy decoding: exact-match accuracy and mean reward on the held-out splits (eval,
    eval_long) and, labelled as such, on the pair-building / GRPO prompts (pairs: what DPO and
    GRPO optimise on, so not held out for them)."""
    result = {}
    for split, key in (("eval", "eval"), ("eval_long", "eval_long"), ("pairs", "pairs")):
        problems = task.split(split)
        if not problems:
            result[f"{key}_accuracy"] = result[f"{key}_reward"] = None
            continue
        comps = sample(model, corpus, problems, 1, temperature=0.0,
                       max_new=task.max_answer_tokens, generator=None)
        rewards = [tasks.score(corpus, c[0], p.answer)
                   for p, c in zip(problems, comps)]
        result[f"{key}_accuracy"] = sum(r == 1.0 for r in rewards) / len(rewards)
        result[f"{key}_reward"] = sum(rewards) / len(rewards)
        if split == "eval":
            result["eval_examples"] = [p.prompt + tasks.completion_text(corpus, c[0])
                                       for p, c in zip(problems[:4], comps[:4])]
    result["val_loss"] = answer_nll(model, corpus, task.eval)
    return result


@torch.no_grad()
def answer_nll(model, corpus, problems: Sequence[tasks.Problem], batch: int = 256):
    """Mean negative log-likelihood per token of the gold answers (and end-of-text) given the
    prompts, teacher-forced: the held-out loss of the alignment stages (summary "val_loss")."""
    if not problems:
        return None
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for lo in range(0, len(problems), batch):
        chunk = problems[lo:lo + batch]
        prompts = [tasks.encode(corpus, p.prompt) for p in chunk]
        b = make_batch([q + tasks.encode(corpus, p.answer) + [corpus.eos_id]
                        for q, p in zip(prompts, chunk)], [len(q) for q in prompts],
                       corpus.eos_id, device, PAD_MULTIPLE)
        with _autocast(device):
            logp = completion_logprobs(model, b).float()
        total -= float((logp * b.mask).sum())
        count += int(b.mask.sum())
    model.train(was)
    return total / count


# --------------------------------------------------------------------------------------------
# One step of each stage (the training loops and ``bench --stage`` run these)
#
# ``update(loss)`` runs backward, clipping and the optimizer step (phases "backward" and
# "optimizer") and returns the learning rate; ``phases`` times the rest. Each returns the step's
# log record, with "tokens": the tokens its forward passes processed.


def sft_step(model, batch: Batch, update, phases: Phases) -> dict:
    with phases("policy_logprobs"):
        loss = sft_loss(completion_logprobs(model, batch), batch.mask)
    lr = update(loss)
    return {"lr": lr, "loss": float(loss.detach()), "tokens": batch.tokens}


def dpo_step(model, batch: Batch, ref_chosen: Optional[torch.Tensor],
             ref_rejected: Optional[torch.Tensor], beta: float, update, phases: Phases,
             ref=None, rpo_alpha: float = 0.0) -> dict:
    """``batch``: the B chosen sequences, then the B rejected ones. The reference log-probs are
    given (computed once before training), or computed here from ``ref`` (on the fly).
    ``rpo_alpha`` > 0 adds that times the chosen completions' mean per-token NLL (``sft_loss``
    on them: RPO)."""
    B = len(batch.seqs) // 2
    tokens = batch.tokens
    if ref is not None:
        with torch.no_grad(), phases("ref_logprobs"):
            lp_ref = sequence_logprobs(ref, batch)
        ref_chosen, ref_rejected = lp_ref[:B], lp_ref[B:]
        tokens *= 2
    with phases("policy_logprobs"):
        logp = completion_logprobs(model, batch)
        lp = logp.sum(dim=-1)
        loss = dpo_loss(lp[:B], lp[B:], ref_chosen, ref_rejected, beta)
        if rpo_alpha > 0:
            loss = loss + rpo_alpha * sft_loss(logp[:B], batch.mask[:B])
    lr = update(loss)
    with torch.no_grad():
        margin = beta * ((lp[:B] - ref_chosen) - (lp[B:] - ref_rejected))
    return {"lr": lr, "loss": float(loss.detach()), "margin": float(margin.mean()),
            "pref_accuracy": float((margin > 0).float().mean()),
            "chosen_logp": float(lp[:B].detach().mean()),
            "rejected_logp": float(lp[B:].detach().mean()), "tokens": tokens}


def rm_step(model, head, batch: Batch, update, phases: Phases, center: float = 0.0) -> dict:
    B = len(batch.seqs) // 2
    with phases("policy_logprobs"):
        r = reward_scores(model, head, batch)
        loss = bradley_terry_loss(r[:B], r[B:], center)
    lr = update(loss)
    with torch.no_grad():
        margin = r[:B] - r[B:]
    return {"lr": lr, "loss": float(loss.detach()), "margin": float(margin.mean()),
            "pref_accuracy": float((margin > 0).float().mean()), "tokens": batch.tokens}


def grpo_step(model, ref, prompts: Sequence[Sequence[int]], score, args, *, max_new: int,
              eos: int, generator, update, phases: Phases) -> dict:
    """One GRPO round: ``args.group_size`` samples per prompt, ``score(completions)`` ->
    (completions, rewards (P, G)), reference log-probs once, then ``args.ppo_epochs`` updates
    on the batch. The old log-probs are the first update's own, detached: the policy has not
    moved yet, so a separate no-grad forward would compute the same values. ``args`` also gives
    temperature, clip_eps, beta."""
    device = next(model.parameters()).device
    G = args.group_size
    with phases("generation"):
        comps = sample_ids(model, prompts, G, temperature=args.temperature, max_new=max_new,
                           eos=eos, generator=generator)
    comps, rewards = score(comps)
    adv = group_advantages(rewards, scale=getattr(args, "scale_rewards", True)).reshape(-1)
    adv = adv.to(device)
    seqs, starts = [], []
    for pr, cs in zip(prompts, comps):
        for c in cs:
            seqs.append(list(pr) + list(c))
            starts.append(len(pr))
    batch = make_batch(seqs, starts, eos, device, PAD_MULTIPLE)
    with torch.no_grad(), phases("ref_logprobs"):
        ref_lp = completion_logprobs(ref, batch, temperature=args.temperature)
    stats, lr, old = {}, None, None
    for _ in range(args.ppo_epochs):
        with phases("policy_logprobs"):
            logp = completion_logprobs(model, batch, temperature=args.temperature)
            if old is None:
                old = logp.detach()
            loss, stats = grpo_loss(logp, old, ref_lp, adv, batch.mask, args.clip_eps,
                                    args.beta)
        lr = update(loss)
    return {"lr": lr, "loss": float(loss.detach()), "reward": float(rewards.mean()),
            "accuracy": float((rewards == 1.0).float().mean()), **stats,
            "completion_tokens": int(batch.mask.sum()),
            "tokens": batch.tokens * (1 + args.ppo_epochs)}


# --------------------------------------------------------------------------------------------
# Options


def add_align_args(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--init", required=True,
                   help="folder (or ckpt.pt) of the checkpoint to start from: pretraining "
                   "for sft, sft for dpo / grpo / rm / ppo")
    p.add_argument("--out", default=f"out/{stage}", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run --out holds (without it such a run is refused)")
    p.add_argument("--backend", choices=("fastattn", "torch"), default="fastattn")
    p.add_argument("--max-steps", type=int, default={"sft": 300, "dpo": 100, "grpo": 50, "rm": 100,
                                                  "ppo": 50}[stage],
                   help="optimizer steps (GRPO, PPO: sampling rounds, each --ppo-epochs steps)")
    p.add_argument("--seed", type=int, default=0, help="seeds batches, sampling and dropout")
    p.add_argument("--lr", type=float, default={"sft": 1e-3, "dpo": 1e-4, "grpo": 1e-4,
                                                 "rm": 3e-4, "ppo": 3e-5}[stage])
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default lr/10)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    if stage in ("sft", "dpo", "rm"):
        p.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches of --batch-size per optimizer step")
    else:   # a round samples its batch with the policy it then updates: no micro-batches
        p.set_defaults(grad_accum=1)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also write OUT/ckpt.pt every N steps (0: at the end only)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue the run in --out from its checkpoint (or from CKPT), with "
                        "exactly the steps an uninterrupted run takes")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop after this step with a checkpoint (--resume continues)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    p.add_argument("--batch-size", type=int, default={"sft": 32, "dpo": 32, "grpo": 16, "rm": 32,
                                                     "ppo": 32}[stage],
                   help="sequences (sft), pairs (dpo, rm) or prompts (grpo, ppo) per step")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cache-dir", default=None,
                   help="tokenizer cache (default: the one recorded in the init checkpoint)")
    p.add_argument("--digits", type=int, default=None,
                   help="addition operands below 10**digits (default: the init checkpoint's "
                   "task, else 2)")
    p.add_argument("--n-train", type=int, default=None, help="SFT problems (default 200)")
    p.add_argument("--n-pairs", type=int, default=None,
                   help="pair-building / GRPO prompts (default 400)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out problems (default 200)")
    p.add_argument("--task-seed", type=int, default=None, help="seed of the problem sets (0)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations "
                   "(0 = before and after training only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    if stage in ("dpo", "grpo", "ppo"):
        p.add_argument("--beta", type=float,
                       default={"dpo": 0.1, "grpo": 0.04, "ppo": 0.3}[stage],
                       help="DPO temperature / GRPO, PPO KL coefficient (PPO: the policy "
                            "tends to pi_ref exp(R / beta); against the demo's stronger reward "
                            "models 0.3 gained 2.6-6.4 points and 0.1 1.8, against a weaker one "
                            "0.05-0.1 lost 2-5; see benchmarks/rm_kl_optimum.py)")
    if stage in ("dpo", "grpo", "rm", "ppo"):
        p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    if stage == "dpo":
        p.add_argument("--ref-on-the-fly", action="store_true",
                       help="compute the reference log-probs of each batch when it is used "
                       "(one more forward per step) instead of once for all pairs up front")
        p.add_argument("--rpo-alpha", type=float, default=1.0,
                       help="weight of an NLL term on the chosen completions (RPO, Pang et al. "
                       "2024): without it DPO lowers the chosen log-probs as well and held-out "
                       "accuracy does not improve on this task; 0 = plain DPO")
    if stage in ("dpo", "rm"):
        p.add_argument("--k", type=int, default=8, help="samples per pair-building prompt")
        p.add_argument("--min-chosen-reward", type=float, default=0.0,
                       help="keep a pair only if its chosen sample scores at least this "
                            "(1.0: only exactly right answers are chosen)")
        p.add_argument("--pairing", choices=("extremes", "all"),
                       default="all" if stage == "rm" else "extremes",
                       help="pairs per prompt: its best and worst sample (extremes), or every "
                            "two distinct samples that score differently (all: more "
                            "comparisons for a reward model from the same samples)")
    if stage == "rm":
        p.add_argument("--center-rewards", type=float, default=0.05,
                       help="weight of mean (r_chosen + r_rejected)^2 added to the loss: zero-"
                            "mean scores per prompt (TRL's center_rewards_coefficient; 0 = off)")
        p.add_argument("--holdout", type=float, default=0.2,
                       help="fraction of the pair-building prompts whose pairs are held out "
                            "for pair_accuracy")
    if stage == "grpo":
        p.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
        p.add_argument("--no-scale-rewards", dest="scale_rewards", action="store_false",
                       help="advantages = reward - group mean, not divided by the group's "
                            "standard deviation (Dr. GRPO)")
    if stage in ("grpo", "ppo"):
        p.add_argument("--ppo-epochs", type=int, default=2 if stage == "grpo" else 4,
                       help="updates per batch of samples (old log-probs fixed)")
        p.add_argument("--clip-eps", type=float, default=0.2, help="ratio clip")
    if stage == "ppo":
        p.add_argument("--reward-model", required=True,
                       help="folder (or ckpt.pt) of an rm checkpoint")
        p.add_argument("--value-clip", type=float, default=0.2,
                       help="value clip around the old values")
        p.add_argument("--vf-coef", type=float, default=0.5, help="value-loss weight")
        p.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
        p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
        p.add_argument("--format-penalty", type=float, default=1.0,
                       help="a completion that is not an answer at all (not a non-empty number "
                            "closed by end-of-text) gets the batch's lowest RM score of an "
                            "answer, less this, instead of its own RM score: the RM has seen "
                            "few or none of them and may score them anywhere (it scored empty "
                            "answers highest)")


# --------------------------------------------------------------------------------------------
# The stages


def _trained_problems(ckpt: dict) -> set:
    """The problems a checkpoint's policy, or any stage before it, trained on: its "trained"
    list (written since every stage carries it on); for an older checkpoint, what its own stage
    trained on (SFT: the train set; the later stages: the pair prompts)."""
    if "trained" in ckpt:
        return {tasks.Problem(a, b) for a, b in ckpt["trained"]}
    saved = ckpt.get("task")
    if not saved:
        return set()
    fields = {f.name for f in dataclasses.fields(tasks.AdditionTask)}
    base = tasks.AdditionTask(**{k: saved[k] for k in fields if k in saved})
    later = ckpt.get("stage") in ("dpo", "grpo", "ppo", "rm")
    return set(base.train) | (set(base.pairs) if later else set())


def _stage_problems(stage: str, task: tasks.AdditionTask) -> list:
    """The problems a stage trains on: SFT the train set; the others prompts of the pair set."""
    return task.train if stage == "sft" else task.pairs


def _warn_short_sets(task: tasks.AdditionTask) -> None:
    """Name the sets that came out smaller than asked, and why: a problem space too small for
    them (few digits), or, for the pair prompts, problems of this draw that the init
    checkpoint's lineage trained or was evaluated on (see _task)."""
    cut = [(flag, len(got), asked) for flag, got, asked in (
        ("--n-eval", task.eval, task.n_eval), ("--n-pairs", task.pairs, task.n_pairs),
        ("--n-train", task.train, task.n_train)) if len(got) < asked]
    if not cut:
        return
    space = 10 ** task.digits
    distinct = space * (space + 1) // 2
    if len(task.pool) == distinct:      # every problem drawn: the space is the limit
        why = (f"{task.digits}-digit addition has {distinct} distinct problems, fewer than the "
               f"sets ask for")
    else:
        why = ("the other problems drawn for this task were trained on or held out by the init "
               "checkpoint's lineage")
    print("warning: " + ", ".join(f"{flag} {asked} cut to {got}" for flag, got, asked in cut)
          + f": {why}", file=sys.stderr)


def _check_held_out(task: tasks.AdditionTask, trained: set, whose: str) -> None:
    """A ValueError if any held-out problem of ``task`` is one ``whose`` lineage trained on."""
    leaked = sum(p in trained for p in task.eval + task.eval_long)
    if leaked:
        raise ValueError(f"{leaked} of the {len(task.eval) + len(task.eval_long)} held-out "
                         f"problems are problems {whose} or a stage before it trained on; keep "
                         f"the task options of its lineage (--digits, --n-train, --n-pairs, "
                         f"--n-eval, --task-seed)")


def _disable_dropout(model) -> None:
    """Dropout off in ``model`` whatever its mode: the residual/MLP/embedding Dropout modules
    and the attention's dropout probability (its config is left as the checkpoint's)."""
    from ..models.gpt import CausalSelfAttention
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(m, CausalSelfAttention):
            m.dropout = 0.0


def _task(args, ckpt: dict, stage: Optional[str] = None) -> tasks.AdditionTask:
    saved = ckpt.get("task") or {}
    kw = {"digits": args.digits, "n_train": args.n_train, "n_pairs": args.n_pairs,
          "n_eval": args.n_eval, "seed": args.task_seed}
    fields = {f.name: f.default for f in dataclasses.fields(tasks.AdditionTask)}
    task = tasks.AdditionTask(**{k: (v if v is not None else saved.get(k, fields[k]))
                                 for k, v in kw.items()} |
                              {"n_eval_long": saved.get("n_eval_long", fields["n_eval_long"])})
    if not saved:
        return task
    # A stage may ask for other set sizes than its init checkpoint's (e.g. more pair prompts
    # for a reward model), which re-cuts the problem pool: keep the problems the checkpoint's
    # lineage trained or was evaluated on out of the new pair prompts, and refuse held-out
    # problems any stage of it trained on (an SFT set, a DPO/GRPO/PPO stage's pair prompts).
    base = tasks.AdditionTask(**{k: saved[k] for k in fields if k in saved})
    trained = _trained_problems(ckpt)
    # (a reward model, whose held-out pairs measure it, must not hold out prompts its trunk
    # trained on: from a DPO/GRPO/PPO init, the pair prompts are cut anew as below)
    if dataclasses.astuple(base) == dataclasses.astuple(task) and not (
            stage == "rm" and trained & set(task.pairs)):
        return task
    _check_held_out(task, trained, "the init checkpoint")
    # The new pair prompts: the first --n-pairs problems of the pool after the held-out set
    # that the lineage neither trained nor was evaluated on (on a small space such as the
    # 5050 two-digit sums, every unused problem, rather than a fresh cut that leaves room for a
    # training set this stage does not use).
    seen = trained | set(base.eval) | set(base.eval_long) | set(task.eval)
    pool = task.pool
    if stage == "rm" and dataclasses.astuple(base) == dataclasses.astuple(task):
        # the same sizes: the pool was drawn for the sets the lineage used; draw on (a longer
        # draw starts as this one does) so that n_pairs problems are left beside them
        pool = tasks.AdditionTask(**(dataclasses.asdict(task) |
                                     {"n_pairs": task.n_pairs + len(seen)})).pool
    task.pairs = [p for p in pool if p not in seen][:task.n_pairs]
    return task


def _corpus(args, ckpt: dict):
    """The corpus (and its tokenizer) the --init checkpoint was trained on, rebuilt from its
    text; a CheckpointError if that text has changed since (the tokenizer would then not be
    the model's). The info recorded in a stage's checkpoint carries the check on."""
    from .data import Corpus
    info = dict(ckpt.get("corpus") or {k: ckpt.get("args", {}).get(k)
                                       for k in ("data", "vocab_size", "cache_dir")})
    if ckpt.get("data_path") is not None:    # absolute: a relative --data was the pretraining
        info["data"] = ckpt["data_path"]     # run's working folder's
    expected = info.get("key", ckpt.get("data_key"))
    if args.cache_dir is not None:
        info["cache_dir"] = args.cache_dir
    corpus = Corpus.build(info.get("data"), vocab_size=info.get("vocab_size") or 8192,
                          cache_dir=info.get("cache_dir"))
    info["key"] = corpus.meta.get("key")
    if expected is not None and info["key"] != expected:
        where = "the embedded corpus" if info.get("data") is None else repr(info["data"])
        raise CheckpointError(f"--init {args.init}: the text at {where} has changed since the "
                              "checkpoint was trained on it, so the rebuilt tokenizer would not "
                              "be the model's; restore that text, or pretrain again on it")
    return corpus, info


def _gpt_config(ckpt: dict, path, what: str):
    """The GPTConfig a --init / --reward-model checkpoint records, or a CheckpointError that
    names what this fastattn cannot build from it (a field it does not know: a checkpoint of
    another version)."""
    from ..models.gpt import GPTConfig
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{what} {path}: its model config is {type(cfg).__name__}, not a "
                              f"dict of GPTConfig fields")
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"{what} {path}: its model config has fields this fastattn's "
                              f"GPTConfig does not know ({', '.join(unknown)}): written by "
                              f"another version?")
    try:
        return GPTConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} {path}: its model config is not one this fastattn can "
                              f"build ({e})") from e


def ckpt_file(path) -> Path:
    """The checkpoint a --init / --reward-model / --policy names: a file, or a run's folder."""
    path = Path(path)
    return path / CKPT_NAME if path.is_dir() else path


def _check_ranges(args: argparse.Namespace, stage: str) -> None:
    """The numeric options each stage has, against their valid ranges (argparse checks types)."""
    finite = math.isfinite
    rules = [
        ("lr", lambda v: finite(v) and v > 0, "a finite number > 0"),
        ("min_lr", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("warmup_steps", lambda v: v >= 0, ">= 0"),
        ("weight_decay", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("clip", lambda v: finite(v) and v >= 0, "a finite number >= 0 (0 = off)"),
        ("value_clip", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("vf_coef", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("k", lambda v: v >= 2, ">= 2 (a pair needs two samples)"),
        ("checkpoint_every", lambda v: v >= 0, ">= 0"), ("stop_after", lambda v: v >= 1, ">= 1"),
        ("grad_accum", lambda v: v >= 1, ">= 1"),
        ("seed", lambda v: 0 <= v < 2 ** 32, "in [0, 2**32 - 1]"),
        ("n_train", lambda v: v >= 1, ">= 1"), ("n_pairs", lambda v: v >= 1, ">= 1"),
        ("n_eval", lambda v: v >= 1, ">= 1"), ("eval_every", lambda v: v >= 0, ">= 0"),
        ("ppo_epochs", lambda v: v >= 1, ">= 1"),
        ("group_size", lambda v: v >= 2, ">= 2 (advantages are normalised within a group)"),
        ("clip_eps", lambda v: finite(v) and v > 0, "a finite number > 0"),
        ("gamma", lambda v: 0 <= v <= 1, "in [0, 1]"), ("lam", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("beta", (lambda v: finite(v) and v > 0) if stage == "dpo" else
                 (lambda v: finite(v) and v >= 0), "> 0" if stage == "dpo" else ">= 0"),
    ]
    # sampled pairs and rollouts: at 0 every sample of a prompt is the same
    rules.append(("temperature", lambda v: finite(v) and v > 0, "a finite number > 0"))
    if stage == "rm":
        rules += [("holdout", lambda v: 0 < v < 1, "in (0, 1)"),
                  ("center_rewards", lambda v: finite(v) and v >= 0, "a finite number >= 0")]
    if args.min_lr is not None and args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine schedule "
                         f"decays from --lr down to --min-lr")
    for name, ok, what in rules:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value}")


# The options a resumed stage never takes from its checkpoint: this command's own (where and
# how it runs); every other option the command line does not give is the checkpoint's.
_STAGE_OWN = ("resume", "stop_after", "overwrite", "out", "init", "device", "cache_dir",
              "no_progress")


# Options a resumed stage may change: how it runs and reports, not which steps it takes. Those
# of the update rule may change too, with a warning (_RESUME_WARNS, as for pretraining); every
# other option must equal the checkpoint's.
_STAGE_RESUME_FREE = ("resume", "stop_after", "checkpoint_every", "no_progress", "overwrite",
                      "eval_every", "device", "cache_dir", "out", "init", "backend",
                      "reward_model")     # (--init and --reward-model: compared by content)


def _merge_micro(records: list) -> dict:
    """One step's log record from its --grad-accum micro-batches' records: tokens summed, the
    other numbers (loss, margins, accuracies) averaged, the rest (the lr) from the last."""
    if len(records) == 1:
        return records[0]
    out = dict(records[-1])
    for key, value in records[-1].items():
        if key == "tokens":
            out[key] = sum(r[key] for r in records)
        elif isinstance(value, float):
            out[key] = sum(r[key] for r in records) / len(records)
    return out


def _check_stage_resume(rck: dict, path: Path, args, stage: str, init_path: Path) -> int:
    """The step a resumed stage continues from, or a CheckpointError when the checkpoint is not
    of this stage's run (another stage, another --init, other sampling or task options)."""
    if rck.get("stage") != stage:
        what = "a pretraining run" if rck.get("stage") is None else f"stage {rck['stage']!r}"
        raise CheckpointError(f"--resume {path}: a checkpoint of {what}, not of {stage}")
    if not isinstance(rck.get("resume"), dict):
        raise CheckpointError(f"--resume {path}: holds no resume state (written by an older "
                              f"fastattn); start the stage again")
    # The same --init: the same file, or (where the path is spelled otherwise, relative to
    # another folder, or the file was moved) the same content, by the fingerprint recorded
    init_fp = checkpoint_fingerprint(init_path) if Path(init_path).is_file() else None
    same_path = Path(str(rck.get("init"))).resolve() == Path(init_path).resolve()
    if not same_path and (init_fp is None or rck.get("init_fingerprint") != init_fp):
        raise CheckpointError(f"--resume {path}: the run started from --init {rck.get('init')}, "
                              f"this one from {init_path} (another checkpoint)")
    if init_fp is not None and rck.get("init_fingerprint") not in (None, init_fp):
        raise CheckpointError(f"--resume {path}: --init {init_path} has changed since the run "
                              "started from it (its pairs, reference and starting weights "
                              "would not be the run's); restore it, or start the stage again")
    rm_given = getattr(args, "reward_model", None)
    if stage == "ppo" and rm_given is not None:
        # by content, as --init (a folder, its ckpt.pt, a relative path: one reward model)
        rm_file, recorded = ckpt_file(rm_given), rck.get("reward_model_fingerprint")
        if recorded and rm_file.is_file():
            differs = checkpoint_fingerprint(rm_file) != recorded
        else:   # (a missing one: its load's error, later)
            differs = (rck.get("reward_model") is not None and rm_file.is_file()
                       and ckpt_file(rck["reward_model"]).resolve() != rm_file.resolve())
        if differs:
            raise CheckpointError(f"--resume {path}: --reward-model {rm_given} is not the reward "
                                  f"model the run started with (its rewards, and so the run's "
                                  f"next steps, would differ); restore it, or start the stage "
                                  f"again")
    skip = set(_STAGE_RESUME_FREE) | set(_RESUME_WARNS)
    keeps = [k for k in rck.get("args", {}) if k not in skip]
    for warning in check_resume_args(rck, path, args, keeps=keeps):
        print(f"warning: {warning}", file=sys.stderr)
    return resume_start(rck, path, args)


def run_stage(args: argparse.Namespace, stage: str) -> dict:
    from ..models.gpt import GPT
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    out = Path(args.out)
    resume_ck = resume_path = None
    if args.resume:
        resume_path = out / CKPT_NAME if args.resume == "auto" else ckpt_file(args.resume)
        resume_ck = load_checkpoint(resume_path, "--resume")
        if resume_ck.get("stage") == stage:     # (another stage's is refused below)
            # `--resume` alone continues the stage as it was started: what the command line
            # does not give comes from the checkpoint, before any option is checked
            adopted = adopt_checkpoint_options(
                resume_ck, args, [k for k in resume_ck.get("args", {}) if k not in _STAGE_OWN])
            if adopted:
                print(f"resuming with the checkpoint's {', '.join(adopted)}", file=sys.stderr)
    for name in ("max_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if stage == "dpo" and not (math.isfinite(args.rpo_alpha) and args.rpo_alpha >= 0):
        raise ValueError(f"--rpo-alpha must be a finite number >= 0, got {args.rpo_alpha}")
    if stage == "ppo" and not (math.isfinite(args.format_penalty) and args.format_penalty >= 0):
        raise ValueError(f"--format-penalty must be a finite number >= 0, got "
                         f"{args.format_penalty}")
    _check_ranges(args, stage)
    device = resolve_device(args.device)
    ckpt_path = ckpt_file(args.init)
    # the run writes OUT/ckpt.pt: never the checkpoint it reads (not even with --overwrite)
    inputs = {"--init": args.init, "--reward-model": getattr(args, "reward_model", None)}
    written = (Path(args.out) / CKPT_NAME).resolve()
    for option, given in inputs.items():
        if given is not None and ckpt_file(given).resolve() == written:
            raise ValueError(f"--out {args.out} is the folder of {option} {given}: the run would "
                             f"overwrite the checkpoint it reads; choose another --out")
    start = 0
    if resume_ck is not None:
        start = _check_stage_resume(resume_ck, resume_path, args, stage, ckpt_path)
    new_run = resume_ck is None or resume_path.resolve() != (out / CKPT_NAME).resolve()
    if new_run:
        check_out_dir(out, args.overwrite, resumable=True)
    ckpt = load_checkpoint(ckpt_path, "--init")
    init_stage = ckpt.get("stage")
    if init_stage == "rm":
        raise CheckpointError(f"--init {args.init} is a reward model; {stage} starts from a "
                              f"policy (pretrain for sft, sft or a later policy stage otherwise)")
    if init_stage is None and stage != "sft":
        raise CheckpointError(f"--init {args.init} is a pretraining checkpoint; {stage} starts "
                              f"from a policy trained on the task: run `fastattn-train sft` "
                              f"first and pass its --out")
    corpus, corpus_info = _corpus(args, ckpt)
    init_fingerprint = checkpoint_fingerprint(ckpt_path)
    cfg = _gpt_config(ckpt, ckpt_path, "--init")
    if cfg.vocab_size != corpus.vocab_size:
        raise CheckpointError(f"{ckpt_path}: vocabulary {cfg.vocab_size} but the rebuilt "
                              f"tokenizer has {corpus.vocab_size}")
    task = _task(args, ckpt, stage)
    _warn_short_sets(task)
    # "Q:" + a + "+" + b + "=" (4 characters and two operands of up to digits + 1 digits, the
    # longer eval problems'), then the answer
    need = 2 * (task.digits + 1) + 4 + task.max_answer_tokens
    if need > cfg.max_seq_len:
        raise ValueError(f"{task.digits}-digit problems (and the longer eval ones) need "
                         f"{need} tokens; the model's max_seq_len is {cfg.max_seq_len}")
    out.mkdir(parents=True, exist_ok=True)

    _seed_all(args.seed)
    model = GPT(cfg, backend=args.backend).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit its own config: {e}") from e
    ref = None
    if stage in ("dpo", "grpo", "ppo"):
        # No dropout in a policy compared with its reference (DPO) or with its own old
        # log-probs (GRPO, PPO, whose samples come from generate(), without dropout): it would
        # put noise into the ratios and a bias into the KL (TRL's disable_dropout)
        if cfg.dropout > 0:
            print(f"{stage}: the checkpoint's dropout {cfg.dropout} is off in this stage (the "
                  f"policy is compared with its reference and its own earlier log-probs)",
                  file=sys.stderr)
        _disable_dropout(model)
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    # rm: the reward head (GPT init); ppo: the value head (zero init: values start at 0), both
    # on the trunk being trained, and the frozen reward model.
    head = None
    if stage == "rm":
        head = RewardHead(cfg.d_model).to(device)
        GPT._init_weights(head.linear)
    elif stage == "ppo":
        head = torch.nn.Linear(cfg.d_model, 1).to(device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    if stage == "ppo":
        rm_model, rm_head, rm_path, rm_trained = _load_reward_model(
            args.reward_model, cfg, corpus_info, args.backend, device)
        _check_held_out(task, rm_trained, f"the reward model {rm_path}")
        rm_fingerprint = checkpoint_fingerprint(rm_path)
    opt = model.configure_optimizer(args.lr, args.weight_decay)
    params = list(model.parameters())
    if head is not None:
        linear = head.linear if stage == "rm" else head
        opt.add_param_group({"params": [linear.weight], "weight_decay": args.weight_decay})
        opt.add_param_group({"params": [p for p in head.parameters() if p is not linear.weight],
                             "weight_decay": 0.0})
        params += list(head.parameters())
    if args.backend == "fastattn":
        from ..optim import clip_grad_norm_
    else:
        from torch.nn.utils import clip_grad_norm_
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    rng = random.Random(f"{stage}/{args.seed}")
    gen = torch.Generator(device=device).manual_seed(args.seed)

    # log.jsonl is opened when the first step starts (records before it wait in `pending`): a
    # run that fails in its setup (no preference pairs, a resume that does not fit) leaves no
    # log behind to block its folder, and a resume that fails keeps its log as it was.
    pending: list = []
    log_f = None

    def log(record: dict) -> None:
        if log_f is None:
            pending.append(record)
            return
        log_f.write(json.dumps(record) + "\n")
        log_f.flush()

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.max_steps, initial=start, desc=f"{stage}/{args.backend}",
                   dynamic_ncols=True)

    eval_key = "pair_accuracy" if stage == "rm" else "eval_accuracy"

    def do_eval(step: int) -> dict:
        if stage == "rm":
            r = rm_evaluate(model, head, held, eos, device)
            log({"kind": "eval", "step": step, **r})
            if bar is not None:
                bar.write(f"rm step {step}: held-out pair accuracy {r['pair_accuracy']:.3f}, "
                          f"loss {r['pair_loss']:.4f}")
            return r
        r = evaluate(model, corpus, task)
        log({"kind": "eval", "step": step, **r})
        if bar is not None:
            bar.write(f"{stage} step {step}: eval accuracy {r['eval_accuracy']:.3f} "
                      f"(longer: {r['eval_long_accuracy']:.3f}), reward {r['eval_reward']:.3f}")
        return r

    eos = corpus.eos_id
    extra: dict = {}
    history: dict = {"train": [], "eval": [], "ppo": []}
    # A resumed run repeats the setup (pairs, reference log-probs: the same from the same seed
    # and init) but not the step-0 evaluation or its log lines: the checkpoint holds them.
    resumed = resume_ck["resume"] if resume_ck is not None else None
    first_eval = resumed["first_eval"] if resumed is not None else None
    if stage != "rm" and resumed is None:
        first_eval = do_eval(0)

    # --- stage-specific data -----------------------------------------------------------------
    if stage == "sft":
        data = [(tasks.encode(corpus, p.prompt), tasks.encode(corpus, p.answer) + [eos])
                for p in task.train]
    elif stage == "dpo":
        t0 = time.perf_counter()
        data, pair_stats = build_pairs(ref, corpus, task, args.k, args.temperature, gen,
                                       min_chosen=args.min_chosen_reward,
                                       pairing=args.pairing)
        extra.update(pair_stats, pair_build_time_s=time.perf_counter() - t0)
        if resumed is None:
            log({"kind": "pairs", **pair_stats})
        if bar is not None:
            bar.write(f"dpo: {pair_stats['pairs']} pairs from {pair_stats['prompts']} prompts; "
                      f"best-of-{args.k} accuracy {pair_stats['best_of_k_accuracy']:.3f}, "
                      f"sample accuracy {pair_stats['sample_accuracy']:.3f}")
        if not data:
            raise ValueError("no preference pairs: every prompt's K samples scored the same; "
                             "raise --k or --temperature")
        if not args.ref_on_the_fly:
            with _autocast(device):     # as the policy's log-probs in the loop
                ref_c, ref_r = _ref_logprobs(ref, data, eos, device)
    elif stage == "rm":
        t0 = time.perf_counter()
        pairs, pair_stats = build_pairs(model, corpus, task, args.k, args.temperature, gen,
                                        min_chosen=args.min_chosen_reward,
                                        pairing=args.pairing)
        if len(pairs) < 2:
            raise ValueError(f"{len(pairs)} preference pairs: the reward model needs >= 2 (one "
                             "held out); raise --k, --temperature or --n-pairs")
        held, data = split_by_prompt(pairs, args.holdout, args.seed)
        pair_stats.update(train_pairs=len(data), heldout_pairs=len(held))
        extra.update(pair_stats, pair_build_time_s=time.perf_counter() - t0)
        # the SFT policy's samples on the held-out problems, judged by the RM after training
        candidates = eval_samples(model, corpus, task, args.k, args.temperature, args.seed + 1)
        if resumed is None:
            log({"kind": "pairs", **pair_stats})
            first_eval = do_eval(0)
    else:
        prompts = task.pairs
    history["eval"].append((0, first_eval[eval_key]))

    # --- the loop ----------------------------------------------------------------------------
    model.train()
    step_times, tokens_seen = [], 0
    phases = Phases(device)
    phase_totals: dict = {}
    opt_steps, train_s_before = 0, 0.0
    if resumed is not None:     # the trained state, after the setup that repeated a new run's
        decays = [g["weight_decay"] for g in opt.param_groups]   # this run's --weight-decay
        try:
            model.load_state_dict(resume_ck["model"])
            if head is not None:
                head.load_state_dict(resume_ck[HEAD_KEYS[stage]])
            opt.load_state_dict(resume_ck["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"--resume {resume_path} does not fit this stage's model and "
                                  f"optimizer: {e}") from e
        for group, decay in zip(opt.param_groups, decays):
            group["weight_decay"] = decay
        try:
            opt_steps, tokens_seen = int(resumed["opt_steps"]), int(resumed["tokens_seen"])
            train_s_before = float(resumed["train_s"])
            phase_totals = dict(resumed["phase_totals"])
            history = {"train": [tuple(x) for x in resume_ck["history"]["train"]],
                       "eval": [tuple(x) for x in resume_ck["history"]["eval"]],
                       "ppo": list(resumed["ppo"])}
            version, internal, gauss = resumed["rng_py"]
            rng.setstate((version, tuple(internal), gauss))
            gen.set_state(resumed["gen"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"--resume {resume_path}: its resume state is damaged "
                                  f"({type(e).__name__}: {e})") from e
        restore_rng_state(resume_ck["rng"][0], device, resume_path)
    run_t0, tokens_before = time.perf_counter(), tokens_seen

    def rate() -> float:
        """This run's tokens per second so far."""
        return (tokens_seen - tokens_before) / max(time.perf_counter() - run_t0, 1e-9)
    total_opt_steps = args.max_steps * (args.ppo_epochs if stage in ("grpo", "ppo") else 1)
    end = args.max_steps if args.stop_after is None else min(args.max_steps, args.stop_after)
    args_json = _json_args(args)
    task_json = dataclasses.asdict(task)
    trained = sorted([p.a, p.b] for p in
                     _trained_problems(ckpt) | set(_stage_problems(stage, task)))

    def checkpoint(step: int) -> None:
        save_checkpoint(out / CKPT_NAME, {
            "format": CKPT_FORMAT, "stage": stage, "step": step, "model":
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "rng": [_rng_state(device)],
            "config": ckpt["config"], "preset": ckpt.get("preset"), "backend": args.backend,
            "args": args_json,
            "history": {"train": [list(x) for x in history["train"]],
                        "eval": [list(x) for x in history["eval"]]},
            "corpus": corpus_info, "task": task_json, "init": str(Path(ckpt_path).resolve()),
            "init_fingerprint": init_fingerprint,
            "trained": trained, "torch": str(torch.__version__),
            **({} if head is None else {HEAD_KEYS[stage]: {k: v.detach().cpu() for k, v in
                                                           head.state_dict().items()}}),
            **({"reward_model": str(Path(rm_path).resolve()),
                "reward_model_fingerprint": rm_fingerprint}
               if stage == "ppo" else {}),
            # what --resume needs beyond the weights to take exactly the next step
            "resume": {"opt_steps": opt_steps, "tokens_seen": tokens_seen,
                       "train_s": train_s_before + time.perf_counter() - run_t0,
                       "phase_totals": phase_totals, "ppo": history["ppo"],
                       "rng_py": rng.getstate(), "gen": gen.get_state(),
                       "first_eval": first_eval}})

    accum, micro = args.grad_accum, 0

    def update(loss: torch.Tensor) -> float:
        """backward, then (every --grad-accum calls) clip and the optimizer step at the
        schedule's lr; returns the lr."""
        nonlocal opt_steps, micro
        lr = lr_at(opt_steps, args.lr, min_lr, args.warmup_steps, total_opt_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, enabled=False):   # the step runs under autocast
            with phases("backward"):
                (loss / accum if accum > 1 else loss).backward()
            micro += 1
            if micro < accum:
                return lr
            micro = 0
            with phases("optimizer"):
                if args.clip > 0:
                    clip_grad_norm_(params, args.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        opt_steps += 1
        return lr

    def offline_step() -> dict:
        """One micro-batch of SFT, DPO or the reward model, drawn from the stage's data."""
        if stage == "sft":
            pick = [data[rng.randrange(len(data))] for _ in range(args.batch_size)]
            batch = make_batch([p + c for p, c in pick], [len(p) for p, _ in pick], eos,
                               device, PAD_MULTIPLE)
            return sft_step(model, batch, update, phases)
        pick = [rng.randrange(len(data)) for _ in range(args.batch_size)]
        batch = make_batch([data[i]["chosen"] for i in pick]
                           + [data[i]["rejected"] for i in pick],
                           [data[i]["start"] for i in pick] * 2, eos, device, PAD_MULTIPLE)
        if stage == "rm":
            return rm_step(model, head, batch, update, phases, args.center_rewards)
        if args.ref_on_the_fly:
            return dpo_step(model, batch, None, None, args.beta, update, phases, ref=ref,
                            rpo_alpha=args.rpo_alpha)
        idx = torch.tensor(pick, device=device)
        return dpo_step(model, batch, ref_c[idx], ref_r[idx], args.beta, update, phases,
                        rpo_alpha=args.rpo_alpha)

    # --overwrite: the old run's files go now, when every check has passed and the setup
    # (preference pairs, reference log-probs) has succeeded, just before the first write
    if args.overwrite and new_run:
        clear_out_dir(out)
    log_f = open_run_log(out / "log.jsonl", start if resume_ck is not None else None)
    for record in pending:
        log(record)
    stop = _StopOnSignals(enabled=True)     # SIGINT / SIGTERM: a checkpoint at a step's end
    interrupted = None
    with stop:
        for it in range(start, end):
            t0 = time.perf_counter()
            phases.reset()
            record: dict = {"kind": "train", "step": it + 1}
            with _autocast(device):     # bf16 on CUDA, as in pretraining; fp32 on the CPU
                if stage in ("sft", "dpo", "rm"):
                    record.update(_merge_micro([offline_step() for _ in range(accum)]))
                elif stage == "ppo":
                    probs = [prompts[rng.randrange(len(prompts))]
                             for _ in range(args.batch_size)]
                    record.update(ppo_step(args, model, head, ref, rm_model, rm_head, corpus,
                                           task, probs, gen, update, phases))
                    history["ppo"].append(record)
                else:
                    probs = [prompts[rng.randrange(len(prompts))] for _ in range(args.batch_size)]

                    def score(comps, probs=probs):
                        return comps, torch.tensor(
                            [[tasks.score(corpus, c, p.answer) for c in cs]
                             for p, cs in zip(probs, comps)])

                    record.update(grpo_step(
                        model, ref, [tasks.encode(corpus, p.prompt) for p in probs], score, args,
                        max_new=task.max_answer_tokens, eos=eos, generator=gen, update=update,
                        phases=phases))
            tokens_seen += record.pop("tokens")
            record["phase_s"] = {k: round(v, 6) for k, v in phases.times.items()}
            for k, v in phases.times.items():
                phase_totals[k] = phase_totals.get(k, 0.0) + v
            dt = time.perf_counter() - t0
            step_times.append(dt)
            record["step_time_s"] = dt
            history["train"].append((it + 1, record["loss"]))
            log(record)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"{stage} loss is {record['loss']} at step {it + 1}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {record['loss']:.4f}"
                                    + (f" | reward {record['reward']:.3f}" if "reward" in record
                                       else "")
                                    + f" | {rate():,.0f} tok/s")
            if args.eval_every > 0 and (it + 1) % args.eval_every == 0 and it + 1 < args.max_steps:
                r = do_eval(it + 1)
                history["eval"].append((it + 1, r[eval_key]))
            model.train()
            if (args.checkpoint_every > 0 and (it + 1) % args.checkpoint_every == 0
                    and it + 1 < end):
                checkpoint(it + 1)
            if stop.signum is not None:     # (in the last step too: the stop is honoured)
                interrupted = it + 1
                break
    if interrupted is not None or end < args.max_steps:
        # SIGINT/SIGTERM, or --stop-after: a checkpoint to --resume from, no closing evaluation
        # (a resumed run's log then holds the evaluations of an uninterrupted run)
        paused = end if interrupted is None else interrupted
        if not (args.checkpoint_every > 0 and paused % args.checkpoint_every == 0
                and interrupted is not None and paused < end):
            checkpoint(paused)          # (otherwise the loop has just written it)
        if bar is not None:
            bar.close()
        log_f.close()
        if interrupted is not None:
            raise TrainingInterrupted(f"{signal_name(stop.signum)}: stopped after step "
                                      f"{interrupted}; checkpoint {out / CKPT_NAME} written; "
                                      "--resume " + ("finishes the run (evaluation and summary)"
                                                     if interrupted == args.max_steps
                                                     else "continues the run"), stop.signum)
        return {"stage": stage, "steps": paused, "paused": True}
    train_s = train_s_before + time.perf_counter() - run_t0
    if end > start:     # first: a stop in the closing evaluation loses no step
        checkpoint(args.max_steps)
    with closing_phase(out / CKPT_NAME, args.max_steps):
        final = do_eval(args.max_steps)
        if stage == "rm":
            extra["train_pair_accuracy"] = rm_evaluate(model, head, data, eos, device)[
                "pair_accuracy"]
            extra.update(rm_best_of_k(model, head, candidates, eos, device))
    history["eval"].append((args.max_steps, final[eval_key]))
    if stage == "rm":
        extra["initial_pair_accuracy"] = first_eval["pair_accuracy"]
        # a reward model's accuracy on the held-out prompts: that of the candidate it picks
        # among the SFT policy's K samples; its held-out loss: the Bradley-Terry loss
        extra.update(eval_accuracy=extra["rm_best_of_k_accuracy"], val_loss=final["pair_loss"])
    if stage == "ppo":
        last = next(r for r in reversed(history["ppo"]))
        extra.update(reward_model=str(rm_path), final_rm_reward=last["rm_reward"],
                     final_verifier_reward=last["verifier_reward"])
    if bar is not None:
        bar.close()
    log_f.close()

    checkpoint(args.max_steps)      # again, with the closing evaluation in its history

    timed = step_times[1:] if len(step_times) > 1 else step_times
    summary = {
        "stage": stage, "init": str(ckpt_path),
        "preset": ckpt.get("preset"), "backend": args.backend, "compile": False,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "dist": "none", "world_size": 1,
        "params": model.num_params(), "params_total": model.num_params(non_embedding=False),
        "config": ckpt["config"], "seq_len": None, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "tokens_per_step": None,
        "steps": args.max_steps, "steps_this_run": len(step_times),
        "resumed_from": start or None,
        "tokens_per_s": tokens_seen / train_s if train_s > 0 else None,
        "step_time_median_s": statistics.median(timed) if timed else None,
        "train_time_s": train_s, "mfu": None, "phase_time_s": phase_totals,
        "peak_flops_bf16": None, "flops_per_token": None, "val_loss": None,
        **run_summary(opt, clip_grad_norm_, history, device),
        "initial_eval_accuracy": first_eval.get("eval_accuracy"),
        "initial_eval_reward": first_eval.get("eval_reward"),
        **final, "task": task_json, **extra,
        "seed": args.seed, "sample": None, "args": args_json,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_stage(history, out / "loss.png", f"{stage} / {args.backend}",
                "held-out pair accuracy" if stage == "rm" else "held-out accuracy")
    return summary


def _plot_stage(history: dict, path: Path, title: str, eval_label: str) -> None:
    """A stage's loss.png: the training loss and, on its own axis, the held-out accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        s, l = zip(*history["train"])
        ax.plot(s, l, label="train loss", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    if history["eval"]:
        s, a = zip(*history["eval"])
        ax2.plot(s, a, "o-", color="tab:orange", label=eval_label, ms=4)
    ax2.set_ylabel(eval_label)
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_pairs(policy, corpus, task: tasks.AdditionTask, k: int, temperature: float,
                generator: torch.Generator, min_chosen: float = 0.0,
                pairing: str = "extremes") -> tuple[list[dict], dict]:
    """K samples per pair-building prompt from the frozen policy, scored by the verifier.
    ``pairing="extremes"``: per prompt, the best- and the worst-scoring sample make one pair;
    ``"all"``: every two distinct samples with different scores make a pair (up to K^2/4 per
    prompt: more comparisons from the same samples). Either way the chosen one scores strictly
    higher and at least ``min_chosen``. Each pair records its prompt's index (``"prompt"``) so
    that a held-out split can keep a prompt's pairs together. The gold answer is only used by
    the verifier, never inserted."""
    if k < 2 or temperature <= 0:
        raise ValueError("pair building needs --k >= 2 and --temperature > 0")
    if pairing not in ("extremes", "all"):
        raise ValueError(f"pairing must be 'extremes' or 'all', got {pairing!r}")
    problems = task.pairs
    comps = sample(policy, corpus, problems, k, temperature=temperature,
                   max_new=task.max_answer_tokens, generator=generator)
    pairs, best_hits, sample_hits, n = [], 0, 0, 0
    for i, (p, cs) in enumerate(zip(problems, comps)):
        scores = [tasks.score(corpus, c, p.answer) for c in cs]
        best_hits += max(scores) == 1.0
        sample_hits += sum(s == 1.0 for s in scores)
        n += len(scores)
        prompt = tasks.encode(corpus, p.prompt)
        if pairing == "extremes":
            hi = max(range(k), key=lambda j: scores[j])
            lo = min(range(k), key=lambda j: scores[j])
            chosen = [(hi, lo)] if scores[hi] > scores[lo] else []
        else:
            # one sample per distinct completion, in sampling order
            first = {}
            for j, c in enumerate(cs):
                first.setdefault(tuple(c), j)
            uniq = sorted(first.values())
            chosen = [(a, b) for a in uniq for b in uniq if scores[a] > scores[b]]
        for hi, lo in chosen:
            if scores[hi] >= min_chosen:
                pairs.append({"chosen": prompt + cs[hi], "rejected": prompt + cs[lo],
                              "start": len(prompt), "prompt": i})
    stats = {"prompts": len(problems), "pairs": len(pairs), "k": k, "pairing": pairing,
             "prompts_with_pairs": len({q["prompt"] for q in pairs}),
             "best_of_k_accuracy": best_hits / max(1, len(problems)),
             "sample_accuracy": sample_hits / max(1, n)}
    return pairs, stats


def split_by_prompt(pairs: list[dict], holdout: float, seed: int) -> tuple[list, list]:
    """(held-out pairs, training pairs): the pairs of a seeded ``holdout`` fraction of the
    prompts (at least one prompt each side). By prompt, not by pair: with ``pairing="all"`` a
    prompt gives several pairs that share samples, and a split by pair would score the reward
    model on samples it trained on."""
    prompt_ids = sorted({q["prompt"] for q in pairs})
    if len(prompt_ids) < 2:
        raise ValueError(f"preference pairs from {len(prompt_ids)} prompt(s): the reward model "
                         "needs pairs from >= 2 prompts (one held out); raise --k, "
                         "--temperature or --n-pairs")
    random.Random(f"rm-holdout/{seed}").shuffle(prompt_ids)
    n_held = min(len(prompt_ids) - 1, max(1, round(holdout * len(prompt_ids))))
    held_ids = set(prompt_ids[:n_held])
    return ([q for q in pairs if q["prompt"] in held_ids],
            [q for q in pairs if q["prompt"] not in held_ids])


@torch.no_grad()
def _ref_logprobs(ref, pairs: list[dict], eos: int, device, batch: int = 128):
    chosen, rejected = [], []
    for lo in range(0, len(pairs), batch):
        chunk = pairs[lo:lo + batch]
        b = make_batch([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk],
                       [p["start"] for p in chunk] * 2, eos, device, PAD_MULTIPLE)
        lp = sequence_logprobs(ref, b)
        chosen.append(lp[:len(chunk)])
        rejected.append(lp[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


class RewardHead(torch.nn.Module):
    """r = linear(h) + logp_weight * mean completion log-prob (see the module docstring)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = torch.nn.Linear(d_model, 1)
        self.logp_weight = torch.nn.Parameter(torch.ones(()))


def reward_scores(model, head: RewardHead, batch: Batch) -> torch.Tensor:
    """(B,) scalar rewards from one pass of ``model``: ``head.linear`` on the final hidden state
    of each sequence's last completion slot (the last answer token, whose target is the
    end-of-text token or the last one sampled), plus ``head.logp_weight`` times the mean
    log-prob of the completion."""
    n_slots = batch.mask.sum(-1)
    if bool((n_slots == 0).any()):
        raise ValueError("reward_scores: every sequence needs a completion of at least one "
                         "token (its end-of-text)")
    logp, values = completion_logprobs(model, batch, head.linear)
    rows = torch.arange(len(batch.seqs), device=batch.ids.device)
    last = torch.tensor([len(q) - 2 for q in batch.seqs], device=batch.ids.device)
    mean_logp = logp.sum(-1) / n_slots
    return values[rows, last] + head.logp_weight * mean_logp


@torch.no_grad()
def rm_evaluate(model, head, pairs: list[dict], eos: int, device, batch: int = 128) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected; ties count as wrong) and Bradley-Terry loss."""
    was = model.training
    model.eval()
    margins = []
    for lo in range(0, len(pairs), batch):
        chunk = pairs[lo:lo + batch]
        b = make_batch([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk],
                       [p["start"] for p in chunk] * 2, eos, device, PAD_MULTIPLE)
        r = reward_scores(model, head, b)
        margins.append(r[:len(chunk)] - r[len(chunk):])
    model.train(was)
    m = torch.cat(margins)
    return {"pair_accuracy": float((m > 0).float().mean()),
            "pair_loss": float(-F.logsigmoid(m).mean())}


def eval_samples(policy, corpus, task: tasks.AdditionTask, k: int, temperature: float,
                 seed: int) -> list[dict]:
    """``k`` samples of ``policy`` for each held-out eval problem (its own generator, so the
    caller's random streams are untouched), each with the verifier's reward: the candidates
    ``rm_best_of_k`` ranks."""
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    problems = task.split("eval")
    comps = sample(policy, corpus, problems, k, temperature=temperature,
                   max_new=task.max_answer_tokens, generator=gen)
    out = []
    for p, cs in zip(problems, comps):
        prompt = tasks.encode(corpus, p.prompt)
        out.append({"seqs": [prompt + c for c in cs], "start": len(prompt),
                    "rewards": [tasks.score(corpus, c, p.answer)
                                for c in cs],
                    "malformed": [not tasks.well_formed(c, corpus) for c in cs]})
    return out


@torch.no_grad()
def rm_best_of_k(model, head, candidates: list[dict], eos: int, device,
                 batch: int = 32, format_penalty: float = 1.0) -> dict:
    """Best-of-k with the reward model as the judge, on held-out problems: the exact-match
    accuracy of the candidate it scores highest per problem (``rm_best_of_k_accuracy``; scores
    through PPO's ``format_floor`` over the problem's candidates, so a non-answer is never
    picked while an answer is there), beside a random sample's (``eval_sample_accuracy``) and
    an oracle's (``eval_best_of_k_ceiling``: some candidate is right); all None without
    candidates. What a policy optimised against the reward model can gain shows here first: a
    judge no better than a random pick gives PPO nothing to climb but its errors."""
    if not candidates:
        return dict.fromkeys(("rm_best_of_k_accuracy", "eval_sample_accuracy",
                              "eval_best_of_k_ceiling"))
    was = model.training
    model.eval()
    picked, sampled, ceiling = 0, 0.0, 0
    for lo in range(0, len(candidates), batch):
        chunk = candidates[lo:lo + batch]
        b = make_batch([q for c in chunk for q in c["seqs"]],
                       [c["start"] for c in chunk for _ in c["seqs"]], eos, device,
                       PAD_MULTIPLE)
        r = reward_scores(model, head, b).float().cpu()
        at = 0
        for c in chunk:
            n = len(c["seqs"])
            exact = [x == 1.0 for x in c["rewards"]]
            score = format_floor(r[at:at + n], torch.tensor(c["malformed"]), format_penalty)
            picked += exact[int(score.argmax())]
            sampled += sum(exact) / n
            ceiling += any(exact)
            at += n
    model.train(was)
    n = len(candidates)
    return {"rm_best_of_k_accuracy": picked / n, "eval_sample_accuracy": sampled / n,
            "eval_best_of_k_ceiling": ceiling / n}


def _load_reward_model(path, cfg, corpus_info: dict, backend: str, device):
    """The frozen reward model (trunk and RewardHead) of an rm checkpoint, its path, and the
    problems it (or a stage before it) trained on; refused unless it reads the policy's
    tokens: the same vocabulary, built from the same corpus."""
    from ..models.gpt import GPT
    path = ckpt_file(path)
    ck = load_checkpoint(path, "--reward-model")
    if HEAD_KEYS["rm"] not in ck:
        raise CheckpointError(f"{path} holds no {HEAD_KEYS['rm']!r} (stage "
                              f"{ck.get('stage')!r}); train one with `fastattn-train rm`")
    rm_cfg = _gpt_config(ck, path, "--reward-model")
    theirs = ck.get("corpus") or {}
    # the corpus by its content key where both record one (paths may be spelled differently)
    same = ("key", "vocab_size") if theirs.get("key") and corpus_info.get("key") else \
        ("data", "vocab_size")
    mismatch = [f"{k} {theirs.get(k)!r} (policy: {corpus_info.get(k)!r})"
                for k in same if theirs.get(k) != corpus_info.get(k)]
    if rm_cfg.vocab_size != cfg.vocab_size:
        mismatch.insert(0, f"vocabulary {rm_cfg.vocab_size} (policy: {cfg.vocab_size})")
    if mismatch:
        raise CheckpointError(f"{path}: the reward model does not read the policy's tokens: "
                              + "; ".join(mismatch))
    rm = GPT(rm_cfg, backend=backend).to(device)
    if set(ck[HEAD_KEYS["rm"]]) == {"weight", "bias"}:
        raise CheckpointError(f"{path}: a reward model from before RewardHead (a linear head on "
                              f"the end-of-text token's hidden state alone); retrain it with "
                              f"`fastattn-train rm`")
    head = RewardHead(rm_cfg.d_model).to(device)
    try:
        rm.load_state_dict(ck["model"])
        head.load_state_dict(ck[HEAD_KEYS["rm"]])
    except RuntimeError as e:
        raise CheckpointError(f"reward model {path} does not fit its own config: {e}") from e
    for mod in (rm, head):
        mod.eval()
        for p in mod.parameters():
            p.requires_grad_(False)
    return rm, head, path, _trained_problems(ck)


def format_floor(score: torch.Tensor, malformed: torch.Tensor, penalty: float) -> torch.Tensor:
    """PPO's final reward per completion: the RM's ``score``, except that a completion that is
    not an answer at all (``malformed``) gets the lowest score of a well-formed answer in the
    batch (of all, if none is) less ``penalty``. The RM has seen few or no such completions and
    may score them anywhere: it scored empty answers highest."""
    answers = score[~malformed] if bool((~malformed).any()) else score
    return torch.where(malformed, answers.min() - penalty, score)


def ppo_step(args, model, head, ref, rm_model, rm_head, corpus, task, probs, generator,
             update, phases: Phases) -> dict:
    """One PPO round: one completion per prompt, per-token rewards
        r_t = -beta (l_t^old - l_t^ref) + [t is the last completion slot] R,
    R from ``format_floor`` (the RM's score, or the floor for a completion that is not an
    answer), GAE, advantages whitened over the batch's completion tokens, ``--ppo-epochs``
    full-batch updates. The verifier's reward is only logged (a growing gap between
    ``rm_reward``, the RM's mean score of the well-formed answers, and ``verifier_reward`` is
    hacking); ``reward`` is the mean R, ``malformed`` the share floored."""
    device = next(model.parameters()).device
    eos = corpus.eos_id
    with phases("generation"):
        comps = sample(model, corpus, probs, 1, temperature=args.temperature,
                       max_new=task.max_answer_tokens, generator=generator)
    seqs, starts = [], []
    for p, cs in zip(probs, comps):
        pr = tasks.encode(corpus, p.prompt)
        seqs.append(pr + cs[0])
        starts.append(len(pr))
    verifier = torch.tensor([tasks.score(corpus, cs[0], p.answer)
                             for p, cs in zip(probs, comps)])
    batch = make_batch(seqs, starts, eos, device, PAD_MULTIPLE)
    mask = batch.mask
    rows = torch.arange(len(seqs), device=device)
    last_slot = torch.tensor([len(q) - 2 for q in seqs], device=device)
    with torch.no_grad():
        with phases("old_logprobs"):
            old, old_v = completion_logprobs(model, batch, head, args.temperature)
        with phases("ref_logprobs"):
            ref_lp = completion_logprobs(ref, batch, temperature=args.temperature)
        with phases("reward_model"):
            score = reward_scores(rm_model, rm_head, batch)
        malformed = torch.tensor([not tasks.well_formed(cs[0], corpus) for cs in comps],
                                 device=device)
        final = format_floor(score, malformed, args.format_penalty)
        kl = (old - ref_lp) * mask
        rewards = -args.beta * kl
        rewards[rows, last_slot] += final
        adv, ret = gae(rewards, old_v, mask, args.gamma, args.lam)
        n = mask.sum().clamp_min(1)
        mean = adv.sum() / n
        std = (((adv - mean) ** 2 * mask).sum() / n).sqrt()
        adv = (adv - mean) / (std + 1e-8) * mask
    stats, rec = {}, {}
    for _ in range(args.ppo_epochs):
        with phases("policy_logprobs"):
            logp, values = completion_logprobs(model, batch, head, args.temperature)
            loss, stats = ppo_loss(logp, old, adv, values, old_v, ret, mask, args.clip_eps,
                                   args.value_clip, args.vf_coef)
        rec["lr"] = update(loss)
    rec.update(loss=float(loss.detach()),
               reward=float(final.mean()),
               rm_reward=float(score[~malformed].mean() if bool((~malformed).any())
                               else score.mean()),
               verifier_reward=float(verifier.mean()),
               malformed=float(malformed.float().mean()),
               accuracy=float((verifier == 1.0).float().mean()),
               kl=float(kl.sum(-1).mean()), value=float((old_v * mask).sum() / n), **stats,
               tokens=batch.tokens * (3 + args.ppo_epochs))
    return rec


def sft(args):
    return run_stage(args, "sft")


def dpo(args):
    return run_stage(args, "dpo")


def grpo(args):
    return run_stage(args, "grpo")


def rm(args):
    return run_stage(args, "rm")


def ppo(args):
    return run_stage(args, "ppo")
