"""What PPO can reach against a reward model, before running it: the greedy accuracy of the
KL-regularised optimum on the held-out problems, estimated by sampling.

    python -m benchmarks.rm_kl_optimum --policy benchmarks/out/demo/sft \\
        --reward-model benchmarks/out/demo/rm [--samples 64 --betas 0.03,0.1,0.3,1]

PPO's objective E[R] - beta KL(pi || pi_ref) is maximised by pi* = pi_ref exp(R / beta) / Z.
For each held-out problem this draws ``--samples`` completions from pi_ref (the policy PPO
starts from), weighs each distinct one by its count times exp(R / beta), R the reward model's
score (with PPO's format floor, over the problem's distinct samples), and checks the
heaviest: pi*'s most likely answer, roughly what greedy decoding of a well-optimised policy
returns (greedy picks token by token). The same with the verifier's reward in
place of R bounds what a perfect reward model would give; beta = inf is pi_ref's own most
sampled answer. A reward model whose pi* is no better than pi_ref gives PPO nothing to gain,
however it is tuned; the beta where pi* is best is the one to train with.
"""

from __future__ import annotations

import argparse
import math

import torch

from fastattn.models.gpt import GPT, GPTConfig
from fastattn.train import align, tasks
from fastattn.train.pretrain import load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="folder (or ckpt.pt) of the PPO start (SFT)")
    p.add_argument("--reward-model", required=True, help="folder (or ckpt.pt) of an rm run")
    p.add_argument("--samples", type=int, default=64, help="completions per problem")
    p.add_argument("--betas", default="0.03,0.1,0.3,1",
                   help="comma-separated KL coefficients (inf is always added)")
    p.add_argument("--format-penalty", type=float, default=1.0, help="as in fastattn-train ppo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    betas = [float(b) for b in args.betas.split(",")]
    if args.samples < 1 or any(not b > 0 for b in betas):
        raise SystemExit("--samples must be >= 1 and every beta > 0")
    betas.append(math.inf)

    ckpt = load_checkpoint(align.ckpt_file(args.policy), "--policy")
    defaults = argparse.Namespace(digits=None, n_train=None, n_pairs=None, n_eval=None,
                                  task_seed=None, cache_dir=None)
    task, (corpus, corpus_info) = align._task(defaults, ckpt), align._corpus(defaults, ckpt)
    cfg = GPTConfig(**ckpt["config"])
    policy = GPT(cfg, backend="fastattn")
    policy.load_state_dict(ckpt["model"])
    rm, head, _, _ = align._load_reward_model(args.reward_model, cfg, corpus_info, "fastattn",
                                              torch.device("cpu"))
    acc = kl_optimum_accuracy(policy, rm, head, corpus, task.split("eval"), args.samples,
                              betas, args.format_penalty, args.seed,
                              task.max_answer_tokens)
    print(f"greedy accuracy of pi_ref exp(R / beta) on {len(task.split('eval'))} held-out "
          f"problems, {args.samples} samples each")
    print(f"{'beta':>6}  {'reward model':>12}  {'verifier':>8}")
    for b in betas:
        print(f"{b:>6g}  {100 * acc[('reward model', b)]:>11.1f}%  "
              f"{100 * acc[('verifier', b)]:>7.1f}%")


@torch.no_grad()
def kl_optimum_accuracy(policy, rm, head, corpus, problems, samples: int, betas,
                        format_penalty: float = 1.0, seed: int = 0,
                        max_new: int = 8) -> dict:
    """{(judge, beta): exact-match accuracy of the heaviest distinct completion under
    count x exp(R / beta)}, judge "reward model" or "verifier"; beta inf: the most sampled."""
    was = policy.training
    policy.eval()
    gen = torch.Generator().manual_seed(seed)
    hits = {(judge, b): 0 for judge in ("reward model", "verifier") for b in betas}
    comps = align.sample(policy, corpus, problems, samples, temperature=1.0,
                         max_new=max_new, generator=gen)
    for prob, cs in zip(problems, comps):
        counts: dict = {}
        for c in cs:
            counts[tuple(c)] = counts.get(tuple(c), 0) + 1
        distinct = list(counts)
        prompt = tasks.encode(corpus, prob.prompt)
        batch = align.make_batch([prompt + list(c) for c in distinct],
                                 [len(prompt)] * len(distinct), corpus.eos_id, "cpu",
                                 align.PAD_MULTIPLE)
        malformed = torch.tensor([not tasks.well_formed(list(c), corpus) for c in distinct])
        verifier = [tasks.reward(tasks.completion_text(corpus, list(c)), prob.answer)
                    for c in distinct]
        scores = {"reward model": align.format_floor(align.reward_scores(rm, head, batch),
                                                     malformed, format_penalty).float(),
                  "verifier": torch.tensor(verifier)}
        log_count = torch.tensor([float(counts[c]) for c in distinct]).log()
        for judge, r in scores.items():
            for b in betas:
                weight = log_count if math.isinf(b) else log_count + r / b
                hits[(judge, b)] += verifier[int(weight.argmax())] == 1.0
    policy.train(was)
    return {key: n / max(1, len(problems)) for key, n in hits.items()}


if __name__ == "__main__":
    main()
