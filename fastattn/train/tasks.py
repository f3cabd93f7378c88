"""A verifiable task for the alignment loops: n-digit addition written as text.

    prompt  "Q:347+589="        completion  "936" + <|endoftext|>

Tokenization. The pretrained model's byte-level BPE may merge digit runs ("10", "200") into one
token, and which runs it merges depends on the corpus and the vocabulary size; a number would
then be split differently from one problem to the next, and a small model would have to learn
the sums of multi-digit tokens. So ``encode`` tokenizes one character at a time: every
character of the prompt and answer is one token of the pretrained vocabulary (byte-level BPE
keeps all 256 single bytes in it, so this always works), digits included. ``decode`` is the
corpus's own, and ``Corpus.decode(encode(s)) == s``.

Problem sets. All sets are drawn from one ``random.Random(seed)`` stream, without repeats across
sets, so they are deterministic and disjoint; ``a+b`` and ``b+a`` count as one problem (a model
that learned one of them from the SFT set would know the other's answer), whose order is drawn:
    train   (SFT, deliberately small)          operands < 10**digits
    pairs   (preference pairs; GRPO prompts)   operands < 10**digits
    eval    (held-out, greedy accuracy)        operands < 10**digits
    eval_long                                  operands with exactly ``digits + 1`` digits
When the space of problems is smaller than asked (1 digit: 55 unordered sums), the sets shrink in
the order eval_long, eval, pairs, train keep what they can, never overlapping.

Reward. 1.0 for an exact answer; otherwise 0.1 x the fraction of the answer's digits that are
right, compared from the right (units with units, tens with tens: the digit a carry error or a
missing digit leaves intact still counts), over max(len(answer), len(completion)) places, so
padding a completion with extra digits is not free.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

PARTIAL_CREDIT = 0.1


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"Q:{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def well_formed(ids: Sequence[int], corpus) -> bool:
    """Whether generated ids are an answer at all: a non-empty run of digits closed by the
    end-of-text token. Says nothing about whether the answer is right (no gold answer used)."""
    ids = list(ids)
    if corpus.eos_id not in ids:
        return False
    text = completion_text(corpus, ids).strip()
    return text.isascii() and text.isdigit()


def score(corpus, ids, answer: str) -> float:
    """``reward`` of a completion's token ids: 0.0 without the end-of-text token (an answer cut
    off by the length limit is not an answer, as ``well_formed`` says too)."""
    ids = list(ids)
    if corpus.eos_id not in ids:
        return 0.0
    return reward(completion_text(corpus, ids), answer)


def reward(completion: str, answer: str) -> float:
    """1.0 if ``completion`` (text before the end-of-text token, surrounding spaces ignored)
    equals ``answer``; else ``PARTIAL_CREDIT`` x the fraction of digits right from the right."""
    got = completion.strip()
    if got == answer:
        return 1.0
    width = max(len(got), len(answer))
    if width == 0:
        return 0.0
    right = sum(1 for x, y in zip(reversed(got), reversed(answer)) if x == y)
    return PARTIAL_CREDIT * right / width


@dataclasses.dataclass
class AdditionTask:
    digits: int = 2
    n_train: int = 200
    n_pairs: int = 400
    n_eval: int = 200
    n_eval_long: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.digits < 1:
            raise ValueError(f"AdditionTask: digits must be >= 1, got {self.digits}")
        rng = random.Random(f"fastattn.addition/{self.digits}/{self.seed}")
        space = 10 ** self.digits
        # Shuffle the whole space when it is small; draw without repeats when it is large. A
        # problem is an unordered pair of operands, written in a drawn order.
        if space * space <= 4 * (self.n_train + self.n_pairs + self.n_eval):
            pool = [(a, b) for a in range(space) for b in range(a, space)]
            rng.shuffle(pool)
            pool = [Problem(a, b) if rng.random() < 0.5 else Problem(b, a) for a, b in pool]
        else:
            seen: set = set()
            pool = []
            need = self.n_train + self.n_pairs + self.n_eval
            while len(pool) < need:
                p = Problem(rng.randrange(space), rng.randrange(space))
                key = (min(p.a, p.b), max(p.a, p.b))
                if key not in seen:
                    seen.add(key)
                    pool.append(p)
        self.pool = pool        # draw order (not a field): a later stage re-cuts pairs from it
        n_eval, n_pairs, n_train = self.n_eval, self.n_pairs, self.n_train
        if len(pool) < n_eval + n_pairs + n_train:
            n_eval = min(n_eval, len(pool) // 4)
            n_pairs = min(n_pairs, (len(pool) - n_eval) // 2)
            n_train = min(n_train, len(pool) - n_eval - n_pairs)
        self.eval = pool[:n_eval]
        self.pairs = pool[n_eval:n_eval + n_pairs]
        self.train = pool[n_eval + n_pairs:n_eval + n_pairs + n_train]
        lo, hi = 10 ** self.digits, 10 ** (self.digits + 1)
        long_rng = random.Random(f"fastattn.addition.long/{self.digits}/{self.seed}")
        self.eval_long = [Problem(long_rng.randrange(lo, hi), long_rng.randrange(lo, hi))
                          for _ in range(self.n_eval_long)]

    def split(self, name: str) -> list[Problem]:
        if name not in ("train", "pairs", "eval", "eval_long"):
            raise ValueError(f"unknown split {name!r}; one of train, pairs, eval, eval_long")
        return getattr(self, name)

    @property
    def max_answer_tokens(self) -> int:
        """Tokens a completion may need on every split: the longest sum plus end-of-text."""
        return self.digits + 2 + 1


def encode(corpus, text: str) -> list[int]:
    """One token per character (see the module docstring); raises if a character is not a
    single token of the vocabulary."""
    ids = []
    for ch in text:
        tok = corpus.encode(ch)
        if len(tok) != 1:
            raise ValueError(f"character {ch!r} is {len(tok)} tokens in this vocabulary")
        ids.append(tok[0])
    return ids


def completion_text(corpus, ids: Sequence[int]) -> str:
    """Decode generated ids up to (not including) the first end-of-text token."""
    ids = list(ids)
    if corpus.eos_id in ids:
        ids = ids[:ids.index(corpus.eos_id)]
    return corpus.decode(ids)
