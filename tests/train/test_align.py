"""The addition task and the alignment loops (fastattn/train/tasks.py, align.py).

Losses are checked against hand-computed float64 values; log-probs of the fastattn backend
against the torch backend (fp32, 1e-5); and a short chain on a very small GPT (2 layers,
d_model 64, 512-token BPE vocabulary in a temporary cache, 1-digit addition):
pretrain 5 steps -> SFT (held-out greedy accuracy rises from 0) -> DPO and GRPO from that SFT
(greedy reward on the prompts they optimise on rises). Seeds are fixed.
"""

import argparse
import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn.models.gpt import GPT, GPTConfig, config
from fastattn.train import align, tasks
from fastattn.train.__main__ import build_parser, main
from tests.helpers import stopped_closing_phase

MODEL = ["--preset", "tiny", "--set", "n_layer=2", "--set", "d_model=64", "--set", "n_head=2",
         "--set", "max_seq_len=32", "--vocab-size", "512", "--batch-size", "4"]


# --------------------------------------------------------------------------------------------
# Task


def test_reward():
    assert tasks.reward("936", "936") == 1.0
    assert tasks.reward(" 936 ", "936") == 1.0
    assert tasks.reward("926", "936") == pytest.approx(0.1 * 2 / 3)
    assert tasks.reward("36", "936") == pytest.approx(0.1 * 2 / 3)      # right-aligned
    assert tasks.reward("1936", "936") == pytest.approx(0.1 * 3 / 4)    # extra digit costs
    assert tasks.reward("", "936") == 0.0
    assert tasks.reward("abc", "936") == 0.0


class _Chars:
    """A corpus of one id per character; 0 is end-of-text."""
    eos_id = 0

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _enc(text):
    return [ord(ch) for ch in text]


def test_score_needs_the_end_of_text_token():
    c, enc = _Chars(), _enc
    assert tasks.score(c, enc("936") + [0] + enc("7"), "936") == 1.0
    assert tasks.score(c, enc("926") + [0], "936") == pytest.approx(0.1 * 2 / 3)
    assert tasks.score(c, enc("936"), "936") == 0.0      # cut off by the length limit


def test_well_formed_is_a_format_check_only():
    c, enc = _Chars(), _enc
    assert tasks.well_formed(enc("936") + [0], c)
    assert tasks.well_formed(enc("12") + [0] + enc("zz"), c)   # cut at end-of-text
    assert tasks.well_formed(enc(" 7 ") + [0], c)              # spaces ignored, as reward does
    assert not tasks.well_formed([0], c)                       # empty answer
    assert not tasks.well_formed(enc("936"), c)                # never ended
    assert not tasks.well_formed(enc("9a6") + [0], c)
    assert not tasks.well_formed(enc("٣") + [0], c)            # a digit, but not an ASCII one


def test_splits_deterministic_disjoint():
    for digits in (1, 3):
        t1, t2 = tasks.AdditionTask(digits=digits, seed=3), tasks.AdditionTask(digits=digits, seed=3)
        assert t1.train == t2.train and t1.eval == t2.eval and t1.eval_long == t2.eval_long
        # disjoint as unordered problems: b+a is not held out when a+b is trained on
        sets = [{frozenset((p.a, p.b)) for p in x} for x in (t1.train, t1.pairs, t1.eval)]
        assert [len(x) for x in sets] == [len(t1.train), len(t1.pairs), len(t1.eval)]
        assert all(len(s) > 0 for s in sets)
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert any(p.a > p.b for p in t1.train) and any(p.a < p.b for p in t1.train)
        assert all(len(str(p.a)) == digits + 1 for p in t1.eval_long)
        assert all(p.a < 10 ** digits and p.b < 10 ** digits for p in t1.train)
    assert tasks.AdditionTask(digits=3, seed=4).train != tasks.AdditionTask(digits=3, seed=3).train


# --------------------------------------------------------------------------------------------
# Losses against hand-computed float64 values


class _CharCorpus:
    """One id per character (ord), end-of-text 0: what tasks.encode / completion_text need."""
    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("pairing", ["extremes", "all"])
def test_build_pairs(monkeypatch, pairing):
    """Pairs from fixed samples: extremes gives best vs worst, all gives every two distinct
    samples that score differently (duplicates once); chosen always scores higher; the gold
    answer is never inserted; min_chosen filters on the chosen sample's score."""
    corpus = _CharCorpus()
    task = tasks.AdditionTask(digits=1, n_train=1, n_pairs=3, n_eval=1)
    answers = [p.answer for p in task.pairs]
    wrong = lambda a: "".join(str((int(ch) + 1) % 10) for ch in a)  # noqa: E731  (no digit right)
    texts = [
        [answers[0], "", answers[0], wrong(answers[0])],   # right twice, empty, wrong
        [wrong(answers[1])] * 4,                             # all the same: no pair
        ["", "", "", answers[2]],                            # one right
    ]
    assert all(tasks.reward(wrong(a), a) == 0.0 for a in answers)
    comps = [[corpus.encode(t) + [0] for t in ts] for ts in texts]
    monkeypatch.setattr(align, "sample", lambda *a, **kw: comps)
    pairs, stats = align.build_pairs(None, corpus, task, 4, 1.0, None, pairing=pairing)
    by_prompt = {}
    for q in pairs:
        start = q["start"]
        prompt = corpus.encode(task.pairs[q["prompt"]].prompt)
        assert q["chosen"][:start] == q["rejected"][:start] == prompt
        c = tasks.completion_text(corpus, q["chosen"][start:])
        r = tasks.completion_text(corpus, q["rejected"][start:])
        a = answers[q["prompt"]]
        assert tasks.reward(c, a) > tasks.reward(r, a)
        assert c in texts[q["prompt"]] and r in texts[q["prompt"]]
        by_prompt.setdefault(q["prompt"], []).append((c, r))
    a0, a2 = answers[0], answers[2]
    if pairing == "extremes":
        assert by_prompt == {0: [(a0, "")], 2: [(a2, "")]}
    else:   # the duplicate right answer pairs once; wrong(a0) and "" both score 0: no pair
        assert sorted(by_prompt[0]) == sorted([(a0, ""), (a0, wrong(a0))])
        assert by_prompt[2] == [(a2, "")]
        assert 1 not in by_prompt
    assert stats["prompts_with_pairs"] == 2 and stats["pairs"] == len(pairs)
    assert stats["best_of_k_accuracy"] == pytest.approx(2 / 3)
    assert stats["sample_accuracy"] == pytest.approx(3 / 12)
    pairs, _ = align.build_pairs(None, corpus, task, 4, 1.0, None, pairing=pairing,
                                 min_chosen=1.1)
    assert pairs == []
    with pytest.raises(ValueError, match="pairing must be"):
        align.build_pairs(None, corpus, task, 4, 1.0, None, pairing="best")


def test_split_by_prompt():
    pairs = [{"prompt": p, "i": i} for i, p in enumerate([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])]
    held, data = align.split_by_prompt(pairs, 0.3, seed=0)
    assert {q["prompt"] for q in held}.isdisjoint({q["prompt"] for q in data})
    assert len({q["prompt"] for q in held}) == 2 and len(held) + len(data) == len(pairs)
    assert align.split_by_prompt(pairs, 0.3, seed=0) == (held, data)       # seeded
    # at least one prompt on each side
    held, data = align.split_by_prompt(pairs, 0.99, seed=1)
    assert len({q["prompt"] for q in data}) == 1
    with pytest.raises(ValueError, match="pairs from 1 prompt"):
        align.split_by_prompt(pairs[:2], 0.5, seed=0)


def test_pad_batch_mask():
    ids, mask = align.pad_batch([[5, 6, 7, 8], [5, 9, 3]], [2, 1], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7, 8], [5, 9, 3, 0]]
    # targets are ids[:, 1:]; completion tokens 7, 8 (row 0) and 9, 3 (row 1); padding is out
    assert mask.tolist() == [[0, 1, 1], [1, 1, 0]]


def test_make_batch_layouts():
    b = align.make_batch([[5, 6, 7, 8], [5, 9, 3]], [2, 1], 0, "cpu", multiple=8)
    assert b.ids.shape == (2, 8) and b.ids[1, 3:].eq(0).all()
    assert b.rows.tolist() == [0, 0, 1, 1] and b.cols.tolist() == [1, 2, 0, 1]
    assert b.targets.tolist() == [7, 8, 9, 3]
    assert b.flat.tolist() == [5, 6, 7, 8, 5, 9, 3]
    assert b.cu_seqlens.tolist() == [0, 4, 7] and b.cu_seqlens.dtype == torch.int32
    assert b.max_len == 4 and b.tokens == 7 and b.padded_tokens == 16


def test_sft_loss_masking():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], dtype=torch.float64,
                        requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float64)
    loss = align.sft_loss(logp, mask)
    assert loss.item() == pytest.approx((2 + 3 + 4) / 3, abs=1e-15)
    loss.backward()
    assert torch.equal(logp.grad, -mask / 3)


def test_sft_loss_is_cross_entropy_on_answer_tokens():
    torch.manual_seed(0)
    model = GPT(config("tiny", n_layer=1, d_model=32, n_head=2, vocab_size=40, max_seq_len=16),
                backend="torch").double()
    batch = align.make_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]], [3, 2], 0, "cpu")
    ids, mask = batch.ids, batch.mask
    loss = align.sft_loss(align.completion_logprobs(model, batch), mask)
    targets = ids[:, 1:].masked_fill(mask == 0, -100)
    logits = model(ids)[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_dpo_loss():
    beta = 0.5
    chosen = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref_c = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    ref_r = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    loss = align.dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    # margins: 0.5 * ((1) - (-1)) = 1 and 0.5 * ((0) - (1)) = -0.5
    m = [1.0, -0.5]
    want = sum(math.log1p(math.exp(-x)) for x in m) / 2
    assert loss.item() == pytest.approx(want, abs=1e-14)
    loss.backward()
    # d/d chosen of -log sigmoid(m) / 2 = -beta * sigmoid(-m) / 2; rejected the opposite
    g = [-beta / (1 + math.exp(x)) / 2 for x in m]
    assert chosen.grad.tolist() == pytest.approx(g, abs=1e-14)
    assert rejected.grad.tolist() == pytest.approx([-x for x in g], abs=1e-14)


def test_group_advantages():
    adv = align.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]],
                                              dtype=torch.float64))
    s = 0.5 / (0.5 + 1e-4)
    assert adv.tolist()[0] == pytest.approx([s, -s, -s, s], abs=1e-14)
    assert adv.tolist()[1] == [0.0] * 4          # no signal when the group agrees
    # unscaled (Dr. GRPO): reward less the group mean, partial credit stays small
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.05, 0.0, 0.0, 0.0]], dtype=torch.float64)
    adv = align.group_advantages(r, scale=False)
    assert adv.tolist()[0] == pytest.approx([0.5, -0.5, -0.5, 0.5], abs=1e-14)
    assert adv.tolist()[1] == pytest.approx([0.0375, -0.0125, -0.0125, -0.0125], abs=1e-14)
    std = math.sqrt((0.0375**2 + 3 * 0.0125**2) / 4)       # scaled: as large as a right answer
    assert align.group_advantages(r).tolist()[1][0] == pytest.approx(0.0375 / (std + 1e-4),
                                                                     abs=1e-12)


def test_grpo_loss_clip_and_kl():
    eps, beta = 0.2, 0.1
    # three sequences, two token slots, the second slot of sequences 0 and 1 is padding
    #   seq 0: ratio 1.5, A = +1 -> clipped at 1.2 (no surrogate gradient)
    #   seq 1: ratio 1.1, A = -1 -> inside the clip range
    #   seq 2: ratios 0.5 and 1.0, A = +1 -> token 0 is clipped at 0.8, but min() keeps
    #          0.5 * A (the pessimistic bound), so its gradient flows
    old = torch.zeros(3, 2, dtype=torch.float64)
    new = torch.tensor([[math.log(1.5), 7.0], [math.log(1.1), -3.0], [math.log(0.5), 0.0]],
                       dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.2, -0.1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 0], [1, 1]], dtype=torch.float64)
    loss, stats = align.grpo_loss(new, old, ref, adv, mask, eps, beta)

    def k3(lp, lr):
        return math.exp(lr - lp) - (lr - lp) - 1

    j0 = 1.2 - beta * k3(math.log(1.5), 0.0)
    j1 = -1.1 - beta * k3(math.log(1.1), 0.0)
    j2 = ((0.5 - beta * k3(math.log(0.5), 0.2)) + (1.0 - beta * k3(0.0, -0.1))) / 2
    assert loss.item() == pytest.approx(-(j0 + j1 + j2) / 3, abs=1e-14)
    loss.backward()
    # d k3 / d lp = 1 - exp(lr - lp); surrogate gradient ratio * A where unclipped
    dk = lambda lp, lr: 1 - math.exp(lr - lp)      # noqa: E731
    g = [[-(0 - beta * dk(math.log(1.5), 0.0)) / 3, 0.0],
         [-(1.1 * -1 - beta * dk(math.log(1.1), 0.0)) / 3, 0.0],
         [-(0.5 - beta * dk(math.log(0.5), 0.2)) / 6, -(1.0 - beta * dk(0.0, -0.1)) / 6]]
    assert new.grad.tolist()[0] == pytest.approx(g[0], abs=1e-14)
    assert new.grad.tolist()[1] == pytest.approx(g[1], abs=1e-14)
    assert new.grad.tolist()[2] == pytest.approx(g[2], abs=1e-14)
    # where the clip is the term min() takes: token 0 of seq 0 (not seq 2's, whose clipped
    # bound 0.8 is above its 0.5)
    assert stats["clip_frac"] == pytest.approx(1 / 4)


# --------------------------------------------------------------------------------------------
# fastattn vs torch log-probs


@pytest.mark.parametrize("preset_kw", [
    {},
    {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1},
])
@pytest.mark.parametrize("shared", [False, True], ids=["distinct-prompts", "shared-prompts"])
def test_logprobs_backends_agree(preset_kw, shared):
    """fastattn (packed, varlen_attention, linear_token_logprobs; with repeated prompts each
    computed once) against torch (padded, SDPA, log_softmax): log-probs, values and every
    parameter's gradient, plus each sequence alone with a full log_softmax."""
    torch.manual_seed(1)
    model = GPT(config("tiny", n_layer=2, d_model=64, n_head=2, vocab_size=97, max_seq_len=32,
                       **preset_kw), backend="torch")
    head = torch.nn.Linear(64, 1)
    seqs = [torch.randint(1, 97, (n,)).tolist() for n in (17, 5, 12, 2)]
    starts = [3, 2, 8, 1]
    if shared:   # DPO / GRPO batches: completions of the same prompts
        seqs += [seqs[0][:3] + [7, 8], seqs[2][:8] + [9], seqs[0][:3] + [4, 5, 6, 0]]
        starts += [3, 8, 3]
    batch = align.make_batch(seqs, starts, 0, "cpu", multiple=8)
    assert (batch.shared is not None) == shared
    w = torch.randn(batch.mask.shape)
    out = {}
    for backend in ("torch", "fastattn"):
        model.set_backend(backend)
        model.zero_grad()
        head.zero_grad()
        lp, val = align.completion_logprobs(model, batch, head)
        assert lp[batch.mask == 0].eq(0).all() and val[batch.mask == 0].eq(0).all()
        ((lp + 0.5 * val) * w).sum().backward()
        seq = align.sequence_logprobs(model, batch).detach()
        torch.testing.assert_close(seq, lp.detach().sum(-1))
        out[backend] = [lp.detach(), val.detach(), head.weight.grad.clone()] + \
            [p.grad.clone() for p in model.parameters()]
    for a, b in zip(out["torch"], out["fastattn"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # each sequence alone, no padding, full log_softmax: the same log-probs
    model.set_backend("torch")
    with torch.no_grad():
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids = torch.tensor([s])
            logp = torch.log_softmax(model(ids)[0, :-1], -1).gather(
                -1, ids[0, 1:, None])[:, 0]
            torch.testing.assert_close(out["fastattn"][0][i, st - 1:len(s) - 1],
                                       logp[st - 1:], rtol=1e-5, atol=1e-5)


def test_reward_scores_per_sequence_and_backends():
    """r = linear(h at the last answer token) + a * mean completion log-prob, each sequence
    computed alone and unpadded; both backends agree; an empty completion is an error."""
    torch.manual_seed(2)
    model = GPT(config("tiny", n_layer=2, d_model=64, n_head=2, vocab_size=97, max_seq_len=32),
                backend="torch").eval()
    head = align.RewardHead(64)
    with torch.no_grad():
        head.logp_weight.fill_(0.7)
    seqs = [torch.randint(1, 97, (n,)).tolist() for n in (9, 4, 13)]
    starts = [5, 3, 2]
    batch = align.make_batch(seqs, starts, 0, "cpu", multiple=8)
    want = []
    with torch.no_grad():
        for s, st in zip(seqs, starts):
            ids = torch.tensor([s])
            h = model.hidden_states(ids)[0]
            logp = torch.log_softmax(model.lm_head(h[:-1]), -1).gather(-1, ids[0, 1:, None])[:, 0]
            want.append(head.linear(h[len(s) - 2]).squeeze() + 0.7 * logp[st - 1:].mean())
        for backend in ("torch", "fastattn"):
            model.set_backend(backend)
            torch.testing.assert_close(align.reward_scores(model, head, batch),
                                       torch.stack(want), rtol=1e-5, atol=1e-5)
        empty = align.make_batch([seqs[0], [5, 6, 7]], [5, 3], 0, "cpu", multiple=8)
        with pytest.raises(ValueError, match="at least one token"):
            align.reward_scores(model, head, empty)


def test_format_floor():
    score = torch.tensor([0.5, 3.0, -1.0, 7.0])
    bad = torch.tensor([False, True, False, True])
    assert align.format_floor(score, bad, 1.0).tolist() == [0.5, -2.0, -1.0, -2.0]
    assert align.format_floor(score, torch.zeros(4, dtype=torch.bool), 1.0).equal(score)
    # none well-formed: the floor is under the lowest score of all
    assert align.format_floor(score, torch.ones(4, dtype=torch.bool), 0.5).tolist() == [-1.5] * 4


def test_packed_hidden_states_match_and_errors():
    torch.manual_seed(0)
    model = GPT(config("tiny", n_layer=2, d_model=64, n_head=4, vocab_size=50, max_seq_len=16,
                       positions="rope", n_kv_head=2), backend="fastattn")
    seqs = [torch.randint(0, 50, (n,)) for n in (7, 1, 16, 4)]
    flat = torch.cat(seqs)
    cu = torch.tensor([0, 7, 8, 24, 28], dtype=torch.int32)
    for backend in ("fastattn", "torch"):
        model.set_backend(backend)
        h = model.packed_hidden_states(flat, cu)
        want = torch.cat([model.hidden_states(s[None])[0] for s in seqs])
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rise strictly from 0"):
        model.packed_hidden_states(flat, torch.tensor([0, 7, 7, 28], dtype=torch.int32))
    with pytest.raises(ValueError, match="rise strictly from 0"):
        model.packed_hidden_states(flat, torch.tensor([0, 7, 20], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32"):
        model.packed_hidden_states(flat, cu.long())
    with pytest.raises(TypeError, match="ids must be a 1-D"):
        model.packed_hidden_states(flat[None], cu)
    with pytest.raises(ValueError, match="max_seqlen 8 is less than"):
        model.packed_hidden_states(flat, cu, max_seqlen=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.packed_hidden_states(torch.zeros(20, dtype=torch.long),
                                   torch.tensor([0, 20], dtype=torch.int32))


def test_shared_prefix_layout_and_hidden_states():
    """make_batch computes each repeated prompt once: the layout (segments, keys,
    the index of every token) and GPT.shared_prefix_hidden_states against each full sequence
    alone, forward and backward, on both backends; bad layouts are refused."""
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [7, 8, 9], [1, 2, 3, 4, 4, 4], [7, 8, 1]]
    starts = [3, 3, 2, 3, 2]
    sh = align.make_batch(seqs, starts, 0, "cpu").shared
    #          prompts: [1 2 3] [7 8]   completions: [4 5] [6] [9] [4 4 4] [1]
    assert sh.ids.tolist() == [1, 2, 3, 7, 8, 4, 5, 6, 9, 4, 4, 4, 1]
    assert sh.cu_seqlens.tolist() == [0, 3, 5, 7, 8, 9, 12, 13]
    assert sh.cu_seqlens_k.tolist() == [0, 3, 5, 10, 14, 17, 23, 26]
    assert sh.kv_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 0, 1, 2, 7, 3, 4, 8,
                                    0, 1, 2, 9, 10, 11, 3, 4, 12]
    for b, s in enumerate(seqs):
        idx = sh.index(torch.full((len(s),), b), torch.arange(len(s)))
        assert sh.ids[idx].tolist() == s
    # nothing shared, or an empty prompt / completion: the plain packed layout
    assert align.make_batch([[1, 2, 3], [4, 5]], [1, 1], 0, "cpu").shared is None
    assert align.make_batch([[1, 2, 3], [1, 2]], [2, 2], 0, "cpu").shared is None

    torch.manual_seed(0)
    model = GPT(config("tiny", n_layer=2, d_model=64, n_head=4, n_kv_head=2, vocab_size=50,
                       max_seq_len=16, positions="rope"), backend="fastattn")
    args = (sh.ids, sh.cu_seqlens, sh.kv_index, sh.cu_seqlens_k)
    w = torch.randn(sh.ids.shape[0], 64)
    for backend in ("fastattn", "torch"):
        model.set_backend(backend)
        model.zero_grad()
        h = model.shared_prefix_hidden_states(*args)
        (h * w).sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        want = torch.zeros_like(h)
        for b, s in enumerate(seqs):
            full = model.hidden_states(torch.tensor([s]))[0]
            idx = sh.index(torch.full((len(s),), b), torch.arange(len(s)))
            own = idx >= sh.suffix_at[b]          # each prompt token once, in its first row
            first = [i for i in range(b + 1) if seqs[i][:starts[i]] == s[:starts[b]]][0] == b
            keep = own | torch.tensor(first)
            want[idx[keep]] = full[keep]
            (full[keep] * w[idx[keep]]).sum().backward()
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="kv_index must be a 1-D int64"):
        model.shared_prefix_hidden_states(*args[:2], sh.kv_index.int(), args[3])
    with pytest.raises(ValueError, match="inconsistent layout"):
        model.shared_prefix_hidden_states(*args[:3], sh.cu_seqlens_k[:-1])
    cu_k = sh.cu_seqlens_k.clone()
    cu_k[1] = 2                                     # segment 0: 3 tokens, 2 keys
    with pytest.raises(ValueError, match="segment 0 has 3 tokens and 2 keys"):
        model.shared_prefix_hidden_states(*args[:3], cu_k)
    kv = sh.kv_index.clone()
    kv[8:10] = kv[8:10].flip(0)                     # segment 2's own keys, reversed
    with pytest.raises(ValueError, match="segment 2's keys must end with its own tokens"):
        model.shared_prefix_hidden_states(*args[:2], kv, args[3])
    kv = sh.kv_index.clone()
    kv[5:8] = torch.tensor([0, 1, 13])              # a prompt key past the tokens
    with pytest.raises(ValueError, match="kv_index must index ids"):
        model.shared_prefix_hidden_states(*args[:2], kv, args[3])
    with pytest.raises(ValueError, match="max_seqlen 2 / max_seqlen_k 6 are less than"):
        model.shared_prefix_hidden_states(*args, max_seqlen=2, max_seqlen_k=6)
    long = align.make_batch([list(range(1, 12)) + [1] * 6, list(range(1, 12)) + [2]], [11, 11],
                            0, "cpu").shared
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_seq_len 16"):
        model.shared_prefix_hidden_states(long.ids, long.cu_seqlens, long.kv_index,
                                          long.cu_seqlens_k)


# --------------------------------------------------------------------------------------------
# A short chain: pretrain -> sft -> dpo / grpo


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    cache = str(tmp_path_factory.mktemp("corpus_cache"))
    assert main(["pretrain", *MODEL, "--no-progress", "--cache-dir", cache, "--max-steps", "5",
                 "--eval-iters", "1", "--out", str(root / "pre")]) == 0
    common = ["--no-progress", "--digits", "1", "--n-eval", "8", "--n-pairs", "12", "--seed", "0"]
    assert main(["sft", "--init", str(root / "pre"), "--out", str(root / "sft"), *common,
                 "--max-steps", "250", "--lr", "3e-3"]) == 0
    return root, common


def _copy_checkpoint(src_dir, dst_dir):
    """dst_dir/ckpt.pt, a byte copy of src_dir's; returns its bytes."""
    dst_dir.mkdir()
    data = (src_dir / "ckpt.pt").read_bytes()
    (dst_dir / "ckpt.pt").write_bytes(data)
    return data


def _summary(path):
    return json.loads((Path(path) / "summary.json").read_text())


def test_sft_run(chain):
    root, _ = chain
    s = _summary(root / "sft")
    for key in ("backend", "steps", "initial_loss", "final_loss", "tokens_per_s", "params",
                "peak_memory_bytes", "device", "torch", "date", "eval_accuracy",
                "eval_long_accuracy", "initial_eval_accuracy"):
        assert key in s, key
    assert s["initial_eval_accuracy"] == 0.0
    assert s["eval_accuracy"] > s["initial_eval_accuracy"]      # held-out prompts, greedy
    assert s["eval_reward"] > s["initial_eval_reward"]
    assert s["eval_accuracy"] < 1.0          # limited train set: far from perfect
    assert s["final_loss"] < s["initial_loss"]
    # the held-out answers' NLL, before and after: SFT lowers it
    evals = [r for r in _log(root / "sft") if r["kind"] == "eval"]
    assert s["val_loss"] == evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert (root / "sft" / "loss.png").exists()
    ckpt = torch.load(root / "sft" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "sft" and ckpt["task"]["digits"] == 1
    log = [json.loads(ln) for ln in (root / "sft" / "log.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in log) == 250


def test_sets_cut_by_a_small_problem_space_are_named(chain, capsys):
    root, common = chain        # 1 digit: 55 distinct sums; 8 eval, 12 pair prompts, 35 train
    capsys.readouterr()
    assert main(["sft", "--init", str(root / "pre"), "--out", str(root / "sft_cut"), *common,
                 "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: --n-train 200 cut to 35: 1-digit addition has 55 distinct problems, " \
           "fewer than the sets ask for" in err, err
    assert "--n-eval" not in err and "--n-pairs" not in err


def test_pair_prompts_cut_by_the_lineage_say_so(capsys):
    from fastattn.train.align import _warn_short_sets
    task = tasks.AdditionTask(digits=2, n_train=20, n_pairs=30, n_eval=10)   # 60 of 5050 drawn
    task.pairs = task.pairs[:7]          # as _task leaves them when the lineage used the rest
    _warn_short_sets(task)
    assert capsys.readouterr().err == (
        "warning: --n-pairs 30 cut to 7: the other problems drawn for this task were trained "
        "on or held out by the init checkpoint's lineage\n")
    _warn_short_sets(tasks.AdditionTask(digits=2, n_train=20, n_pairs=30, n_eval=10))
    assert capsys.readouterr().err == ""


def test_dpo_run(chain):
    root, common = chain
    assert main(["dpo", "--init", str(root / "sft"), "--out", str(root / "dpo"), *common,
                 "--max-steps", "60", "--lr", "3e-4", "--k", "8"]) == 0
    s = _summary(root / "dpo")
    assert s["pairs"] > 0 and 0 <= s["best_of_k_accuracy"] <= 1
    # the checkpoint lists what its lineage trained on: SFT's set and DPO's pair prompts
    ck = torch.load(root / "dpo" / "ckpt.pt", weights_only=True)
    task = tasks.AdditionTask(**ck["task"])
    assert {tuple(p) for p in ck["trained"]} == {(p.a, p.b) for p in task.train + task.pairs}
    assert s["initial_eval_accuracy"] == _summary(root / "sft")["eval_accuracy"]
    assert s["pairs_reward"] > _summary(root / "sft")["pairs_reward"]


def test_dpo_reference_on_the_fly_matches_precomputed(chain, tmp_path):
    root, common = chain
    losses = {}
    for name, extra in (("once", []), ("fly", ["--ref-on-the-fly"])):
        assert main(["dpo", "--init", str(root / "sft"), "--out", str(tmp_path / name), *common,
                     "--max-steps", "3", "--n-eval", "4", *extra]) == 0
        log = [json.loads(ln) for ln in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in log if r["kind"] == "train"]
        phases = [r["phase_s"] for r in log if r["kind"] == "train"]
        assert ("ref_logprobs" in phases[0]) == (name == "fly")
    assert losses["once"] == pytest.approx(losses["fly"], rel=1e-4)


def test_grpo_run(chain):
    root, common = chain
    assert main(["grpo", "--init", str(root / "sft"), "--out", str(root / "grpo"), *common,
                 "--max-steps", "25", "--lr", "3e-4", "--batch-size", "8"]) == 0
    s = _summary(root / "grpo")
    log = [json.loads(ln) for ln in (root / "grpo" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert len(train) == 25 and all(r["kl"] >= 0 for r in train)
    assert any(r["clip_frac"] > 0 for r in train)      # the second update of a batch clips
    assert s["pairs_reward"] > _summary(root / "sft")["pairs_reward"]


def test_cli_errors(tmp_path, capsys):
    assert main(["sft", "--init", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    args = build_parser().parse_args(["grpo", "--init", "x"])
    assert args.group_size == 8 and args.ppo_epochs == 2 and args.clip_eps == 0.2
    assert args.scale_rewards is True
    assert build_parser().parse_args(["grpo", "--init", "x", "--no-scale-rewards"]).scale_rewards \
        is False


@pytest.mark.parametrize("argv,match", [
    (["grpo", "--ppo-epochs", "0"], "--ppo-epochs must be >= 1"),
    (["ppo", "--reward-model", "r", "--ppo-epochs", "0"], "--ppo-epochs must be >= 1"),
    (["grpo", "--group-size", "1"], "--group-size must be >= 2"),
    (["grpo", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["ppo", "--reward-model", "r", "--temperature", "0"], "--temperature must be"),
    (["dpo", "--beta", "-1"], "--beta must be > 0"),
    (["grpo", "--beta", "nan"], "--beta must be >= 0"),
    (["ppo", "--reward-model", "r", "--gamma", "-5"], r"--gamma must be in \[0, 1\]"),
    (["ppo", "--reward-model", "r", "--lam", "7"], r"--lam must be in \[0, 1\]"),
    (["grpo", "--clip-eps", "0"], "--clip-eps must be a finite number > 0"),
    (["sft", "--n-eval", "-1"], "--n-eval must be >= 1"),
    (["sft", "--n-train", "0"], "--n-train must be >= 1"),
    (["dpo", "--n-pairs", "0"], "--n-pairs must be >= 1"),
    (["sft", "--lr", "0"], "--lr must be a finite number > 0"),
    (["grpo", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["dpo", "--min-lr", "-1"], "--min-lr must be a finite number >= 0"),
    (["sft", "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["rm", "--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["dpo", "--clip", "-1"], r"--clip must be a finite number >= 0 \(0 = off\)"),
    (["ppo", "--reward-model", "r", "--value-clip", "-0.1"], "--value-clip must be"),
    (["ppo", "--reward-model", "r", "--vf-coef", "nan"], "--vf-coef must be"),
    (["dpo", "--k", "1"], "--k must be >= 2"),
    (["dpo", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["rm", "--holdout", "0"], r"--holdout must be in \(0, 1\)"),
    (["rm", "--center-rewards", "-1"], "--center-rewards must be a finite number >= 0"),
])
def test_out_of_range_stage_options_are_refused(tmp_path, capsys, argv, match):
    """Checked before anything is loaded (--init x does not exist)."""
    assert main([argv[0], "--init", str(tmp_path / "x"), "--out", str(tmp_path / "o"),
                 *argv[1:]]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_init_must_be_a_policy_and_out_must_not_be_it(chain, tmp_path, capsys):
    root, common = chain
    assert main(["dpo", "--init", str(root / "pre"), "--out", str(tmp_path / "a"), *common]) == 2
    assert "is a pretraining checkpoint" in capsys.readouterr().err
    copy_dir = tmp_path / "sftcopy"
    before = _copy_checkpoint(root / "sft", copy_dir)
    assert main(["grpo", "--init", str(copy_dir), "--out", str(copy_dir), *common]) == 2
    assert "is the folder of --init" in (err := capsys.readouterr().err)
    assert "would overwrite the checkpoint it reads" in err
    assert (copy_dir / "ckpt.pt").read_bytes() == before
    assert main(["grpo", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    assert "--init: no checkpoint at" in capsys.readouterr().err


def test_pretrain_does_not_resume_an_alignment_checkpoint(chain, tmp_path, capsys):
    root, _ = chain
    out = tmp_path / "sftcopy"
    before = _copy_checkpoint(root / "sft", out)
    assert main(["pretrain", *MODEL, "--no-progress", "--out", str(out), "--resume",
                 "--max-steps", "1000"]) == 2
    assert "a checkpoint of the alignment stage 'sft', not of a pretraining run" in \
        capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before and sorted(out.iterdir()) == [out / "ckpt.pt"]


def test_problems_longer_than_the_model_are_refused_before_the_run(chain, tmp_path, capsys):
    """8 digits: the longer eval prompts "Q:" + 9 + "+" + 9 + "=" (22 tokens) and an answer of
    up to 11 need 33 positions; the model has 32. Refused before anything is written."""
    root, _ = chain
    out = tmp_path / "long"
    assert main(["sft", "--init", str(root / "pre"), "--out", str(out), "--no-progress",
                 "--digits", "8", "--n-eval", "4", "--max-steps", "1"]) == 2
    assert "need 33 tokens; the model's max_seq_len is 32" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_stage_does_not_replace_another_run_in_its_out(chain, tmp_path, capsys):
    root, common = chain
    out = tmp_path / "sft2"
    argv = ["sft", "--init", str(root / "pre"), "--out", str(out), *common, "--max-steps", "2",
            "--n-eval", "4"]
    assert main(argv) == 0
    before = (out / "ckpt.pt").read_bytes()
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert ("already holds a run (ckpt.pt, summary.json, log.jsonl, loss.png): --resume "
            "continues it, "
            "--overwrite replaces it") in err
    assert (out / "ckpt.pt").read_bytes() == before
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert _summary(out)["seed"] == 1


# --------------------------------------------------------------------------------------------
# Reward model and PPO


def test_bradley_terry_loss():
    rc = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
    loss = align.bradley_terry_loss(rc, rr)
    d = [1.0, -2.0, 0.0]
    want = sum(math.log1p(math.exp(-x)) for x in d) / 3      # -log sigmoid(d) = log(1 + e^-d)
    assert loss.item() == pytest.approx(want, abs=1e-14)
    (2.5 * loss).backward()                                  # grad_output != 1
    # d/d r_c of -log sigmoid(r_c - r_r) / N = -sigmoid(-(r_c - r_r)) / N = -1 / (1 + e^d) / N
    g = [-2.5 / (1 + math.exp(x)) / 3 for x in d]
    assert rc.grad.tolist() == pytest.approx(g, abs=1e-14)
    assert rr.grad.tolist() == pytest.approx([-x for x in g], abs=1e-14)
    # centering: + c * mean (r_c + r_r)^2, gradient 2 c (r_c + r_r) / N on both
    rc.grad = rr.grad = None
    with pytest.raises(ValueError, match="center must be a finite number >= 0"):
        align.bradley_terry_loss(rc, rr, center=-0.1)
    loss = align.bradley_terry_loss(rc, rr, center=0.1)
    s = [3.0, 0.0, 1.0]
    assert loss.item() == pytest.approx(want + 0.1 * sum(x * x for x in s) / 3, abs=1e-14)
    loss.backward()
    g = [-1 / (1 + math.exp(x)) / 3 for x in d]
    assert rc.grad.tolist() == pytest.approx([a + 0.2 * b / 3 for a, b in zip(g, s)], abs=1e-14)
    assert rr.grad.tolist() == pytest.approx([-a + 0.2 * b / 3 for a, b in zip(g, s)], abs=1e-14)


def test_gae_terminal_step():
    gamma, lam = 0.9, 0.8
    # row 0: completion slots 1..2, slot 3 is padding (slot 2 is terminal); row 1: slots 0..3
    r = torch.tensor([[5.0, 0.1, 1.0, 9.0], [0.0, 0.0, -0.5, 2.0]], dtype=torch.float64)
    v = torch.tensor([[7.0, 0.5, 0.4, 3.0], [0.2, 0.3, 0.1, 0.6]], dtype=torch.float64)
    m = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv, ret = align.gae(r, v, m, gamma, lam)
    # row 0: terminal delta_2 = 1.0 - 0.4 = 0.6; delta_1 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04
    a02 = 0.6
    a01 = -0.04 + gamma * lam * a02
    d13 = 2.0 - 0.6
    d12 = -0.5 + gamma * 0.6 - 0.1
    d11 = 0.0 + gamma * 0.1 - 0.3
    d10 = 0.0 + gamma * 0.3 - 0.2
    a13 = d13
    a12 = d12 + gamma * lam * a13
    a11 = d11 + gamma * lam * a12
    a10 = d10 + gamma * lam * a11
    assert adv.tolist()[0] == pytest.approx([0.0, a01, a02, 0.0], abs=1e-14)
    assert adv.tolist()[1] == pytest.approx([a10, a11, a12, a13], abs=1e-14)
    assert ret.tolist()[0] == pytest.approx([0.0, a01 + 0.5, a02 + 0.4, 0.0], abs=1e-14)
    assert ret.tolist()[1] == pytest.approx([a10 + 0.2, a11 + 0.3, a12 + 0.1, a13 + 0.6],
                                            abs=1e-14)


def test_ppo_loss_clip():
    eps, vclip, c = 0.2, 0.5, 0.5
    # tokens: (0,0) ratio 1.5, A=+2 -> clipped at 1.2; (0,1) ratio 0.9, A=-1 -> inside;
    # (1,0) ratio 0.5, A=-1 -> clipped at 0.8 (the bound -0.8 is taken); (1,1) padding
    old = torch.zeros(2, 2, dtype=torch.float64)
    new = torch.tensor([[math.log(1.5), math.log(0.9)], [math.log(0.5), 4.0]],
                       dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[2.0, -1.0], [-1.0, 3.0]], dtype=torch.float64)
    old_v = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # V - V_old: 1.0 (clipped to 0.5), 0.2 (inside), -2.0 (clipped to -0.5)
    val = torch.tensor([[1.0, 1.2], [-2.0, 5.0]], dtype=torch.float64, requires_grad=True)
    ret = torch.tensor([[2.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    loss, stats = align.ppo_loss(new, old, adv, val, old_v, ret, mask, eps, vclip, c)
    pg = -(1.2 * 2 + 0.9 * -1 + 0.8 * -1) / 3
    # value terms max((V-R)^2, (Vclip-R)^2): (1, 2.25) -> 2.25 (clipped branch, no grad);
    # (1.44, 1.44) -> inside; (1, 0.25) -> 1 (clipped, but max keeps the unclipped branch)
    vf = 0.5 * (2.25 + 1.44 + 1.0) / 3
    assert loss.item() == pytest.approx(pg + c * vf, abs=1e-14)
    assert stats["pg_loss"] == pytest.approx(pg, abs=1e-14)
    assert stats["vf_loss"] == pytest.approx(vf, abs=1e-14)
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    assert stats["vf_clip_frac"] == pytest.approx(2 / 3)
    loss.backward()
    # policy: d/dl of -rho A / 3 = -rho A / 3 where unclipped, 0 where the clip is taken
    assert new.grad.flatten().tolist() == pytest.approx([0.0, 0.9 / 3, 0.0, 0.0], abs=1e-14)
    # value: c * 0.5 * 2 (V - R) / 3 where the unclipped branch is the max
    assert val.grad.flatten().tolist() == pytest.approx([0.0, c * 1.2 / 3, c * -1.0 / 3, 0.0],
                                                        abs=1e-14)


def test_rm_best_of_k_picks_the_top_score(monkeypatch):
    """Per problem the candidate the reward model scores highest is judged, after PPO's format
    floor; here the score is the sequence's last token, so the picks are known: problem 0
    picks its right answer, problem 1 a wrong one (its right one scores lower), problem 2 has
    no right answer, problem 3's top score is a non-answer, floored, so its right one wins."""
    cands = [{"seqs": [[5, 1], [5, 9], [5, 3]], "start": 1, "rewards": [0.0, 1.0, 0.2],
              "malformed": [False, False, False]},
             {"seqs": [[6, 8], [6, 2]], "start": 1, "rewards": [0.5, 1.0],
              "malformed": [False, False]},
             {"seqs": [[7, 4], [7, 6]], "start": 1, "rewards": [0.0, 0.3],
              "malformed": [False, False]},
             {"seqs": [[8, 9], [8, 5]], "start": 1, "rewards": [0.0, 1.0],
              "malformed": [True, False]}]
    monkeypatch.setattr(align, "reward_scores",
                        lambda model, head, b: torch.tensor([float(q[-1]) for q in b.seqs]))
    model = torch.nn.Linear(1, 1)
    got = align.rm_best_of_k(model, None, cands, eos=0, device="cpu", batch=3)
    assert got["rm_best_of_k_accuracy"] == pytest.approx(2 / 4)
    assert got["eval_sample_accuracy"] == pytest.approx((1 / 3 + 1 / 2 + 0 + 1 / 2) / 4)
    assert got["eval_best_of_k_ceiling"] == pytest.approx(3 / 4)
    assert model.training
    assert align.rm_best_of_k(model, None, [], eos=0, device="cpu") == {
        "rm_best_of_k_accuracy": None, "eval_sample_accuracy": None,
        "eval_best_of_k_ceiling": None}


def test_later_stage_task_keeps_the_checkpoint_problems_apart():
    """A stage that asks for more pair prompts than its init checkpoint re-cuts the pool: the
    checkpoint's training and held-out problems stay out of the new pair prompts, and held-out
    problems the checkpoint trained on are refused."""
    base = tasks.AdditionTask(digits=2, n_train=300, n_pairs=200, n_eval=100)
    ckpt = {"task": dataclasses.asdict(base)}

    def args(**kw):
        return argparse.Namespace(**({"digits": None, "n_train": None, "n_pairs": None,
                                      "n_eval": None, "task_seed": None} | kw))

    same = align._task(args(), ckpt)
    assert same.pairs == base.pairs and same.eval == base.eval and same.train == base.train
    raw = tasks.AdditionTask(digits=2, n_train=300, n_pairs=2000, n_eval=100)
    assert set(raw.pairs) & set(base.train)       # what re-cutting alone would leak
    more = align._task(args(n_pairs=2000), ckpt)
    assert more.eval == base.eval
    assert not set(more.pairs) & (set(base.train) | set(base.eval))
    assert len(more.pairs) == 2000 and more.pairs[:len(base.pairs)] == base.pairs
    # on a small space, every problem no stage trained or was evaluated on: 5050 unordered
    # two-digit sums less 1000 SFT problems and 500 held out (a fresh cut would keep room for a
    # training set the later stage does not use, and leave 1550 of them out)
    demo = tasks.AdditionTask(digits=2, n_train=1000, n_pairs=2000, n_eval=500)
    every = align._task(args(n_pairs=8000), {"task": dataclasses.asdict(demo), "stage": "sft"})
    assert len(every.pairs) == 5050 - 1000 - 500 == len(set(every.pairs))
    assert not set(every.pairs) & (set(demo.train) | set(demo.eval) | set(demo.eval_long))
    with pytest.raises(ValueError, match="held-out problems are problems the init checkpoint "
                                         "or a stage before it trained on"):
        align._task(args(n_eval=1000), ckpt)
    # an SFT checkpoint trained on its train set only: held-out problems may come from its pair
    # prompts; a DPO (GRPO, PPO) checkpoint trained on those too
    bigger = align._task(args(n_eval=300), ckpt | {"stage": "sft"})
    assert set(bigger.eval) & set(base.pairs) and not set(bigger.eval) & set(base.train)
    with pytest.raises(ValueError, match="held-out problems"):
        align._task(args(n_eval=300), ckpt | {"stage": "dpo"})
    # what a stage writes: every problem its lineage trained on, also those of an older task
    older = tasks.AdditionTask(digits=2, n_train=50, n_pairs=10, n_eval=10, seed=7)
    lineage = {"task": dataclasses.asdict(base), "stage": "grpo",
               "trained": [[p.a, p.b] for p in older.train]}
    assert align._trained_problems(lineage) == set(older.train)
    clash = next(p for p in older.train if p not in base.train + base.pairs + base.eval)
    lineage["trained"].append([base.eval[0].a, base.eval[0].b])
    with pytest.raises(ValueError, match="held-out problems"):
        align._task(args(n_pairs=250), lineage)
    assert clash not in align._task(args(n_pairs=250), lineage | {"trained": [
        [p.a, p.b] for p in older.train]}).pairs


def test_a_reward_model_holds_out_no_prompt_its_trunk_trained_on():
    """rm from a DPO (GRPO, PPO) checkpoint of the same task: that lineage trained on the pair
    prompts, so the RM's pairs (whose held-out part measures it) are cut anew from the rest;
    from an SFT checkpoint they stay the task's. PPO refuses held-out problems its reward
    model's lineage trained on."""
    base = tasks.AdditionTask(digits=3, n_train=300, n_pairs=200, n_eval=100)
    args = argparse.Namespace(digits=None, n_train=None, n_pairs=None, n_eval=None,
                              task_seed=None)
    sft = {"task": dataclasses.asdict(base), "stage": "sft",
           "trained": [[p.a, p.b] for p in base.train]}
    assert align._task(args, sft, "rm").pairs == base.pairs
    dpo = sft | {"stage": "dpo", "trained": sft["trained"] + [[p.a, p.b] for p in base.pairs]}
    assert align._task(args, dpo, "grpo").pairs == base.pairs    # training again: allowed
    rm = align._task(args, dpo, "rm")
    assert len(rm.pairs) == 200 and rm.eval == base.eval
    assert not set(rm.pairs) & (set(base.train) | set(base.pairs) | set(base.eval))
    align._check_held_out(base, set(base.pairs), "the reward model x")
    with pytest.raises(ValueError, match="5 of the 200 held-out problems are problems the "
                                         "reward model x or a stage before it trained on"):
        align._check_held_out(base, set(base.pairs) | set(base.eval[:5]), "the reward model x")


def test_policy_stages_run_without_dropout():
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, vocab_size=64, max_seq_len=16, dropout=0.5)
    model = GPT(cfg, backend="torch").train()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(idx), model(idx))          # dropout on
    align._disable_dropout(model)
    out = model(idx)
    assert torch.equal(out, model(idx)) and torch.equal(out, model.eval()(idx))
    assert model.config.dropout == 0.5                       # the checkpoint's config kept


def test_grpo_log_probs_are_of_the_sampling_temperature(monkeypatch):
    """The policy, old and reference log-probs are those of the tempered distribution the
    completions were sampled from (as TRL and OpenRLHF compute them)."""
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=32, vocab_size=64, max_seq_len=16)
    torch.manual_seed(0)
    model, seen = GPT(cfg, backend="torch"), []
    ref = copy.deepcopy(model).eval()
    logprobs = align.completion_logprobs
    monkeypatch.setattr(align, "completion_logprobs", lambda *a, **k: (
        seen.append(k.get("temperature", a[3] if len(a) > 3 else 1.0)), logprobs(*a, **k))[1])
    args = argparse.Namespace(group_size=2, temperature=0.7, ppo_epochs=2, clip_eps=0.2,
                              beta=0.1)
    align.grpo_step(model, ref, [[1, 2, 3], [4, 5]], lambda comps: (comps, torch.tensor(
        [[1.0, 0.0], [0.0, 1.0]])), args, max_new=3, eos=0, generator=torch.Generator(),
        update=lambda loss: 0.0, phases=align.Phases(torch.device("cpu")))
    assert seen == [0.7] * 3
    # and a tempered log-prob is the log-softmax of the logits over the temperature
    h = torch.randn(5, 32)
    t = torch.randint(0, 64, (5,))
    want = torch.log_softmax(model.lm_head(h) / 0.7, -1).gather(-1, t[:, None]).squeeze(-1)
    for backend in ("torch", "fastattn"):
        got = align.lm_logprobs(model.set_backend(backend), h, t, 0.7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _log(path):
    return [json.loads(ln) for ln in (Path(path) / "log.jsonl").read_text().splitlines()]


def test_rm_run(chain, capsys):
    root, common = chain
    assert main(["rm", "--init", str(root / "sft"), "--out", str(root / "rm_bad"), *common,
                 "--center-rewards", "-1"]) == 2
    assert "--center-rewards must be a finite number >= 0" in capsys.readouterr().err
    assert main(["rm", "--init", str(root / "sft"), "--out", str(root / "rm"), *common,
                 "--max-steps", "40", "--lr", "1e-3", "--k", "8", "--center-rewards", "0.01",
                 "--eval-every", "20"]) == 0
    s = _summary(root / "rm")
    evals = [r for r in _log(root / "rm") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 20, 40]      # before, mid-run, after
    assert all(0.0 <= r["pair_accuracy"] <= 1.0 for r in evals)
    assert s["heldout_pairs"] >= 1 and s["train_pairs"] >= 1
    assert s["pairing"] == "all" and s["heldout_pairs"] + s["train_pairs"] == s["pairs"]
    assert s["pairs"] >= s["prompts_with_pairs"]
    for key in ("pair_accuracy", "train_pair_accuracy", "initial_pair_accuracy", "final_loss"):
        assert s[key] is not None, key
    # at this size (a few dozen pairs, ~10 held out) held-out accuracy is noisy; the training
    # pair accuracy and the training loss are what is reliable
    assert s["train_pair_accuracy"] > 0.5
    train = [r["loss"] for r in _log(root / "rm") if r["kind"] == "train"]
    assert sum(train[-10:]) < sum(train[:10])
    for key in ("rm_best_of_k_accuracy", "eval_sample_accuracy"):
        assert 0.0 <= s[key] <= s["eval_best_of_k_ceiling"] <= 1.0, key
    assert s["eval_accuracy"] == s["rm_best_of_k_accuracy"]
    assert s["val_loss"] == evals[-1]["pair_loss"] and (root / "rm" / "loss.png").exists()
    # a reward model is not a policy to start a stage from
    assert main(["dpo", "--init", str(root / "rm"), "--out", str(root / "dpo_bad"), *common]) == 2
    assert "is a reward model" in capsys.readouterr().err
    ckpt = torch.load(root / "rm" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "rm" and ckpt["reward_head"]["linear.weight"].shape == (1, 64)
    assert ckpt["reward_head"]["logp_weight"].shape == ()


def test_ppo_run(chain, capsys):
    root, common = chain
    _rm_for(root, common)
    assert main(["ppo", "--init", str(root / "sft"), "--reward-model", str(root / "rm"),
                 "--out", str(root / "ppo"), *common, "--max-steps", "6", "--batch-size",
                 "16"]) == 0
    s = _summary(root / "ppo")
    for key in ("eval_accuracy", "initial_eval_accuracy", "final_rm_reward",
                "final_verifier_reward", "reward_model", "final_loss"):
        assert key in s, key
    train = [r for r in _log(root / "ppo") if r["kind"] == "train"]
    assert len(train) == 6
    for r in train:
        assert math.isfinite(r["rm_reward"]) and 0 <= r["verifier_reward"] <= 1
        assert math.isfinite(r["vf_loss"]) and r["clip_frac"] >= 0
        assert 0 <= r["malformed"] <= 1
        if r["malformed"] == 0:        # otherwise the malformed ones get the batch's floor
            assert r["reward"] == pytest.approx(r["rm_reward"], abs=1e-5)
    ckpt = torch.load(root / "ppo" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "ppo" and "value_head" in ckpt
    assert main(["ppo", "--init", str(root / "sft"), "--reward-model", str(root / "sft"),
                 "--out", str(root / "bad")]) == 2      # an sft checkpoint has no reward head
    # a reward model of another tokenizer (another corpus, the same vocabulary size)
    other = torch.load(root / "rm" / "ckpt.pt", weights_only=True)
    other["corpus"] = dict(other["corpus"], data="/elsewhere/corpus.txt", key="f" * 64)
    from fastattn.train.pretrain import save_checkpoint
    save_checkpoint(root / "rm_other" / "ckpt.pt", other)
    capsys.readouterr()
    assert main(["ppo", "--init", str(root / "sft"), "--reward-model", str(root / "rm_other"),
                 "--out", str(root / "bad")]) == 2
    assert f"does not read the policy's tokens: key {'f' * 64!r}" in capsys.readouterr().err
    assert main(["ppo", "--init", str(root / "sft"), "--reward-model", str(root / "rm"),
                 "--out", str(root / "bad"), "--format-penalty", "-1"]) == 2
    capsys.readouterr()
    rm_before = (root / "rm" / "ckpt.pt").read_bytes()    # --overwrite does not reach it either
    assert main(["ppo", "--init", str(root / "sft"), "--reward-model", str(root / "rm"),
                 "--out", str(root / "rm"), *common, "--overwrite"]) == 2
    assert "is the folder of --reward-model" in capsys.readouterr().err
    assert (root / "rm" / "ckpt.pt").read_bytes() == rm_before
    old = torch.load(root / "rm" / "ckpt.pt", weights_only=True)     # a pre-RewardHead head
    old["reward_head"] = {"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}
    torch.save(old, root / "old_rm.pt")
    with pytest.raises(align.CheckpointError, match="from before RewardHead"):
        align._load_reward_model(root / "old_rm.pt", GPTConfig(**old["config"]), old["corpus"],
                                 "torch", torch.device("cpu"))


def _rm_for(root, common):
    if not (root / "rm" / "ckpt.pt").exists():
        assert main(["rm", "--init", str(root / "sft"), "--out", str(root / "rm"), *common,
                     "--max-steps", "40", "--lr", "1e-3", "--k", "8"]) == 0
    return root / "rm"


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "rm", "ppo"])
def test_stage_resume_is_exact(chain, tmp_path, stage, capsys):
    """A stage stopped after step 2 (--stop-after) and resumed takes exactly the steps of an
    uninterrupted run: the same losses, evaluations and final weights, and its log holds the
    records of one run."""
    root, common = chain
    init = root / ("pre" if stage == "sft" else "sft")
    argv = [stage, "--init", str(init), *common, "--max-steps", "4", "--eval-every", "2",
            "--batch-size", "4"]
    if stage in ("dpo", "rm"):
        argv += ["--k", "4"]
    if stage == "ppo":
        argv += ["--reward-model", str(_rm_for(root, common))]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*argv, "--out", str(full)]) == 0
    assert main([*argv, "--out", str(part), "--stop-after", "2"]) == 0
    assert not (part / "summary.json").exists()
    assert torch.load(part / "ckpt.pt", weights_only=True)["step"] == 2
    # a changed sampling option is refused; a changed learning rate is a warning
    assert main([*argv, "--out", str(part), "--resume", "--seed", "5"]) == 2
    assert "differs from the checkpoint's in --seed 5 (checkpoint: 0)" in capsys.readouterr().err
    # `--resume` with only the required options: the rest comes from the checkpoint
    required = [stage, "--init", str(init), "--no-progress"]
    if stage == "ppo":
        required += ["--reward-model", str(_rm_for(root, common))]
    assert main([*required, "--out", str(part), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming with the checkpoint's" in err and "--max-steps 4" in err, err
    assert "warning: resuming" not in err, err
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("step_time_s", "phase_s")}
                         for r in log if r["kind"] != "pairs"]                # noqa: E731
    assert strip(_log(part)) == strip(_log(full))
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (full, part))
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = _summary(full), _summary(part)
    for key in ("eval_accuracy", "val_loss", "final_loss", "initial_loss"):
        assert sa[key] == sb[key], key
    assert sb["resumed_from"] == 2 and sb["steps_this_run"] == 2
    # finished: nothing to train
    assert main([*argv, "--out", str(part), "--resume"]) == 2
    assert "nothing to train" in capsys.readouterr().err


@pytest.mark.parametrize("max_steps", [5, 2], ids=["mid-run", "last-step"])
def test_sigterm_stops_a_stage_with_a_checkpoint_and_resume_continues(chain, tmp_path,
                                                                       monkeypatch, capsys,
                                                                       max_steps):
    """SIGTERM during step 2 stops the run when the step ends, with its checkpoint (also where
    --checkpoint-every falls on it), and --resume gives the uninterrupted run's losses; in the
    last step too (the stop was dropped there), where --resume takes no step and finishes."""
    import signal
    root, common = chain
    argv = ["sft", "--init", str(root / "pre"), *common, "--max-steps", str(max_steps),
            "--eval-every", "0", "--batch-size", "4", "--checkpoint-every", "2"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    real, calls = align.sft_step, []

    def step_then_sigterm(*a, **kw):
        calls.append(1)
        if len(calls) == 2:     # during step 2: the run stops when the step ends
            signal.raise_signal(signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(align, "sft_step", step_then_sigterm)
    out = tmp_path / "stopped"
    assert main([*argv, "--out", str(out)]) == 128 + signal.SIGTERM
    assert "SIGTERM: stopped after step 2" in capsys.readouterr().err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL       # handler put back
    monkeypatch.setattr(align, "sft_step", real)
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    losses = [[r["loss"] for r in _log(d) if r["kind"] == "train"]
              for d in (tmp_path / "full", out)]
    assert len(losses[0]) == max_steps and losses[0] == losses[1]
    full, resumed = _summary(tmp_path / "full"), _summary(out)
    assert resumed["steps_this_run"] == max_steps - 2
    assert resumed["eval_accuracy"] == full["eval_accuracy"]


def test_a_stage_resumes_with_its_init_spelled_another_way(chain, tmp_path, monkeypatch):
    """--init recorded as given (relative) was compared, resolved against the new working
    folder, with the path of the resumed run: the same checkpoint refused. It is now recorded
    resolved, and a path spelled otherwise is taken when the file's content is the same."""
    root, common = chain
    argv = [*common, "--max-steps", "2", "--eval-every", "0", "--batch-size", "4"]
    monkeypatch.chdir(root)
    assert main(["sft", "--init", "pre", *argv, "--out", str(tmp_path / "run"),
                 "--stop-after", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--init", str(root / "pre" / "ckpt.pt"), *argv,
                 "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert _summary(tmp_path / "run")["steps"] == 2
    # moved elsewhere, same content: taken; another checkpoint: refused
    _copy_checkpoint(root / "pre", tmp_path / "moved")
    assert main(["sft", "--init", str(tmp_path / "moved"), *argv, "--max-steps", "3",
                 "--out", str(tmp_path / "run"), "--resume"]) == 0
    with pytest.raises(align.CheckpointError,
                       match="the run started from --init .*another checkpoint"):
        align.run_stage(build_parser().parse_args(
            ["sft", "--init", str(root / "sft"), *argv, "--max-steps", "4",
             "--out", str(tmp_path / "run"), "--resume"]), "sft")


def test_an_init_whose_config_this_version_cannot_build_is_a_clear_error(chain, tmp_path,
                                                                        capsys):
    root, common = chain
    ck = torch.load(root / "pre" / "ckpt.pt", weights_only=True)
    ck["config"]["rope_theta_v2"] = 1e4
    (tmp_path / "odd").mkdir()
    torch.save(ck, tmp_path / "odd" / "ckpt.pt")
    assert main(["sft", "--init", str(tmp_path / "odd"), *common, "--max-steps", "1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not know (rope_theta_v2)" in err and "Traceback" not in err


def test_a_stop_in_a_stages_closing_evaluation_loses_no_step(chain, tmp_path, monkeypatch,
                                                              capsys):
    """The last step's checkpoint comes before the closing evaluation; --resume then takes no
    step and writes what the uninterrupted run writes."""
    root, common = chain
    argv = ["sft", "--init", str(root / "pre"), *common, "--max-steps", "3", "--eval-every", "0",
            "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    monkeypatch.setattr(align, "closing_phase", stopped_closing_phase(2))
    out = tmp_path / "stopped"
    assert main([*argv, "--out", str(out)]) == 130
    assert "stopped in the closing evaluation" in capsys.readouterr().err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    full, resumed = _summary(tmp_path / "full"), _summary(out)
    assert resumed["steps_this_run"] == 0
    for key in ("eval_accuracy", "final_loss"):
        assert resumed[key] == full[key], key
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("step_time_s", "phase_s")}
                         for r in log]                                        # noqa: E731
    assert strip(_log(out)) == strip(_log(tmp_path / "full"))


def test_a_stage_refuses_an_init_whose_corpus_text_changed(tmp_path, capsys):
    """The tokenizer is rebuilt from the pretraining run's text: changed since, it would not be
    the model's (ids shifted silently). A relative --data is found from any working folder."""
    import os
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("".join(f"Q:{a}+{b}={a + b}\nThe quick brown fox {a}.\n"
                                        for a in range(60) for b in range(3)))
    cache = str(tmp_path / "cache")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["pretrain", *MODEL, "--no-progress", "--cache-dir", cache, "--max-steps",
                     "1", "--eval-iters", "1", "--vocab-size", "300", "--data", "corpus",
                     "--out", str(tmp_path / "pre")]) == 0
    finally:
        os.chdir(cwd)
    argv = ["sft", "--init", str(tmp_path / "pre"), "--no-progress", "--digits", "1",
            "--n-eval", "4", "--max-steps", "1", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "sft")]) == 0      # from another folder
    (data / "a.txt").write_text((data / "a.txt").read_text().replace("quick", "slow"))
    assert main([*argv, "--out", str(tmp_path / "sft2")]) == 2
    assert "has changed since the checkpoint was trained on it" in capsys.readouterr().err


def test_a_stage_resume_refuses_a_replaced_init(chain, tmp_path, capsys):
    root, common = chain
    init = tmp_path / "init"
    _copy_checkpoint(root / "sft", init)
    argv = ["sft", "--init", str(init), *common, "--max-steps", "3", "--eval-every", "0",
            "--batch-size", "2", "--out", str(tmp_path / "run")]
    assert main([*argv, "--stop-after", "1"]) == 0
    other = torch.load(init / "ckpt.pt", weights_only=True)     # another checkpoint, same path
    other["model"] = {k: v + 0.01 if v.is_floating_point() else v
                      for k, v in other["model"].items()}
    from fastattn.train.pretrain import save_checkpoint
    save_checkpoint(init / "ckpt.pt", other)
    assert main([*argv, "--resume"]) == 2
    assert "has changed since the run started from it" in capsys.readouterr().err


def test_a_ppo_resume_refuses_a_replaced_reward_model(chain, tmp_path, capsys):
    """The rewards decide the next steps: a reward model swapped at its path is an error, as a
    replaced --init is (before: the run went on against the other model, silently)."""
    root, common = chain
    rm = tmp_path / "rm"
    _copy_checkpoint(_rm_for(root, common), rm)
    argv = ["ppo", "--init", str(root / "sft"), "--reward-model", str(rm), *common,
            "--max-steps", "3", "--eval-every", "0", "--batch-size", "2",
            "--out", str(tmp_path / "run")]
    assert main([*argv, "--stop-after", "1"]) == 0
    other = torch.load(rm / "ckpt.pt", weights_only=True)
    other["reward_head"] = {k: v + 0.5 for k, v in other["reward_head"].items()}
    from fastattn.train.pretrain import save_checkpoint
    save_checkpoint(rm / "ckpt.pt", other)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "is not the reward model the run started with" in capsys.readouterr().err


def test_overwrite_keeps_the_old_run_when_the_setup_fails(chain, tmp_path, monkeypatch, capsys):
    """--overwrite removes the old run only once the new one's setup has succeeded (the
    preference pairs exist): a failed attempt leaves the old run as it was."""
    root, common = chain
    out = tmp_path / "dpo"
    argv = ["dpo", "--init", str(root / "sft"), "--out", str(out), *common, "--max-steps", "1",
            "--k", "4", "--batch-size", "2", "--eval-every", "0"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(align, "build_pairs", lambda *a, **kw: ([], {
        "pairs": 0, "prompts": 0, "best_of_k_accuracy": 0.0, "sample_accuracy": 0.0}))
    assert main([*argv, "--overwrite"]) == 2
    assert "no preference pairs" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_stage_that_fails_in_its_setup_leaves_no_log(chain, tmp_path, monkeypatch, capsys):
    """No preference pairs (known only after sampling): the error, and nothing in --out that
    would block the next attempt there."""
    root, common = chain
    monkeypatch.setattr(align, "build_pairs", lambda *a, **kw: ([], {
        "pairs": 0, "prompts": 0, "best_of_k_accuracy": 0.0, "sample_accuracy": 0.0}))
    out = tmp_path / "dpo"
    argv = ["dpo", "--init", str(root / "sft"), "--out", str(out), *common, "--max-steps", "1"]
    assert main(argv) == 2
    assert "no preference pairs" in capsys.readouterr().err
    assert not (out / "log.jsonl").exists() and not (out / "ckpt.pt").exists()
    monkeypatch.undo()
    assert main([*argv, "--k", "4", "--batch-size", "2"]) == 0


def test_dpo_grad_accum_equals_the_whole_batch(chain, tmp_path):
    """--grad-accum 2 of 2 pairs draws the same 4 pairs as one batch of 4 and, the DPO loss
    being a mean over pairs, takes the same steps (to float rounding). (Not with the RPO term:
    its NLL is a mean over the batch's tokens, which micro-batches weigh differently.)"""
    root, common = chain
    argv = ["dpo", "--init", str(root / "sft"), *common, "--max-steps", "3", "--k", "4",
            "--eval-every", "0", "--rpo-alpha", "0"]
    assert main([*argv, "--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    assert main([*argv, "--out", str(tmp_path / "two"), "--batch-size", "2",
                 "--grad-accum", "2"]) == 0
    losses = [[r["loss"] for r in _log(tmp_path / d) if r["kind"] == "train"]
              for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"]
            for d in ("one", "two"))
    # Adam turns float-rounding differences of near-zero gradients into ~1% of an update
    # (lr 1e-4 x 3 steps); a different batch would move weights by ~1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert _summary(tmp_path / "two")["grad_accum"] == 2


def test_rm_kl_optimum_script(chain):
    """benchmarks/rm_kl_optimum.py: with the verifier as the judge and a tiny beta, pi*'s mode is
    a right answer whenever any sample is one, so that entry bounds every other."""
    root, _ = chain
    if not (root / "rm" / "ckpt.pt").exists():
        assert main(["rm", "--init", str(root / "sft"), "--out", str(root / "rm"),
                     "--no-progress", "--max-steps", "20", "--k", "8"]) == 0
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rm_kl_optimum", "--policy",
                           str(root / "sft"), "--reward-model", str(root / "rm"), "--samples",
                           "8", "--betas", "0.001,0.3"], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines()[2:]:
        beta, rm_acc, ver_acc = line.split()
        rows[float(beta)] = (float(rm_acc.rstrip("%")), float(ver_acc.rstrip("%")))
    assert set(rows) == {0.001, 0.3, math.inf}
    ceiling = rows[0.001][1]
    assert all(0 <= v <= ceiling for r in rows.values() for v in r)
    assert ceiling > 0


# --------------------------------------------------------------------------------------------
# fastattn-train bench --stage sft|dpo|grpo

BENCH_MODEL = ["--preset", "tiny", "--set", "n_layer=1", "--set", "d_model=32", "--set",
               "n_head=2", "--vocab-size", "64", "--prompt-len", "6", "--completion-len", "6",
               "--batch-size", "3"]


@pytest.mark.parametrize("stage,isolate", [("sft", "yes"), ("dpo", "no"), ("grpo", "no")])
def test_stage_bench(tmp_path, capsys, stage, isolate):
    from fastattn.train.align_bench import PHASES
    assert main(["bench", "--stage", stage, *BENCH_MODEL, "--group-size", "2", "--steps", "2",
                 "--warmup", "1", "--isolate", isolate, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]
    assert [r["variant"] for r in rows] == ["torch eager", "fastattn"]
    assert all("error" not in r for r in rows), rows
    for r in rows:
        assert set(r["phase_time_median_s"]) == set(PHASES[stage])
        assert all(t > 0 for t in r["phase_time_median_s"].values())
        assert r["step_time_median_s"] >= sum(r["phase_time_median_s"].values()) * 0.5
        assert all(p >= 0 for p in r["phase_peak_bytes"].values())
        # the run's peak spans every phase (each phase resets the peak counter)
        assert r["peak_memory_bytes"] >= max(r["phase_peak_bytes"].values())
        assert r["peak_memory_with_warmup_bytes"] >= r["peak_memory_bytes"]
    assert rows[1]["speedup_vs_baseline"] > 0 and "logprob_phases_peak_ratio" in rows[1]
    if stage != "grpo":   # same weights, same synthetic batches: the same losses
        for x, y in zip(rows[0]["losses"], rows[1]["losses"]):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-5)
    captured = capsys.readouterr()
    assert "| policy_logprobs" in captured.out and "| step" in captured.out
    # host memory mapped afresh per step, with the allocator settings it depends on (the timed
    # runs' own, not the memory pass's)
    from fastattn.train.hostmem import allocator_env
    assert all(isinstance(r["page_faults_per_step"], (int, float)) for r in rows)
    assert report["allocator_env"] == allocator_env()
    assert (f"page faults per step (median): torch eager {rows[0]['page_faults_per_step']:,.0f}, "
            f"fastattn {rows[1]['page_faults_per_step']:,.0f}; allocator: ") in captured.out
    done = [x for x in captured.err.splitlines() if x.startswith(f"bench --stage {stage}: ")
            and " done in " in x]
    assert len(done) == 2 and all("phase ms: " in x for x in done), done


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_stage_steps_under_bf16_autocast(monkeypatch, stage):
    """What runs on a GPU (every step under bf16 autocast, backward and optimizer outside it),
    here with the CPU's autocast: both backends run each stage's step with their matmuls in
    bf16, and SFT / DPO give the same losses on both (the second step's: DPO's first is log 2
    whatever the model)."""
    from fastattn.train import align_bench, pretrain
    monkeypatch.setattr(pretrain, "_autocast",
                        lambda device: torch.autocast(device.type, dtype=torch.bfloat16))
    seen = []                          # autocast state inside the steps' forward passes
    hidden_at = align.hidden_at
    monkeypatch.setattr(align, "hidden_at", lambda *a: seen.append(
        torch.is_autocast_enabled("cpu") if hasattr(torch, "get_autocast_dtype")
        else torch.is_autocast_cpu_enabled()) or hidden_at(*a))
    args = build_parser().parse_args(["bench", "--stage", stage, *BENCH_MODEL, "--group-size",
                                      "2", "--steps", "2", "--warmup", "0"])
    losses = [align_bench.run_variant(args, name, memory=False)["losses"][-1]
              for name in ("torch eager", "fastattn")]
    assert seen and all(seen), seen
    assert all(math.isfinite(x) for x in losses), losses
    if stage != "grpo":                # grpo samples in bf16: the samples may differ
        assert losses[0] == pytest.approx(losses[1], rel=2e-2, abs=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS peak reset is Linux's")
def test_stage_bench_peak_leaves_out_the_warm_up(monkeypatch):
    """One-time memory of the warm-up steps (Triton's autotuning on a GPU) is not the step's:
    the step's peak is the timed steps', the whole run's kept beside it."""
    from fastattn.train import align_bench
    calls, sft_step = [], align.sft_step

    def first_call_spikes(*a, **k):
        if not calls:                       # 256 MiB touched and freed in the warm-up only
            torch.ones(64 * 2**20).sum()
        calls.append(1)
        return sft_step(*a, **k)

    monkeypatch.setattr(align, "sft_step", first_call_spikes)
    args = build_parser().parse_args(["bench", "--stage", "sft", *BENCH_MODEL, "--steps", "2",
                                      "--warmup", "1"])
    row = align_bench.run_variant(args, "torch eager", memory=True)
    assert len(calls) == 3
    # (the timed steps' peak keeps what the first step loads for good: libraries, caches)
    assert row["peak_memory_bytes"] >= 0, row
    assert (row["peak_memory_with_warmup_bytes"] - row["peak_memory_bytes"]
            >= 192 * 2**20), row


def test_stage_bench_errors(tmp_path, capsys):
    assert main(["bench", "--stage", "dpo", *BENCH_MODEL, "--completion-len", "300",
                 "--out", str(tmp_path)]) == 2
    assert "exceeds max_seq_len" in capsys.readouterr().err
    assert main(["bench", "--stage", "grpo", *BENCH_MODEL, "--group-size", "0",
                 "--out", str(tmp_path)]) == 2
    assert "--group-size must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--stage", "dpo", *BENCH_MODEL, "--variants", "torch.compile",
                 "--out", str(tmp_path)]) == 2
    assert "unknown ['torch.compile']" in capsys.readouterr().err
    assert main(["dpo", "--init", str(tmp_path / "x"), "--rpo-alpha", "-1"]) == 2
    assert "--rpo-alpha must be a finite number >= 0" in capsys.readouterr().err
