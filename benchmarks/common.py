"""Shared benchmark helpers: CPU peak-memory measurement, result table, CSV and PNG output, and
the check of each row's outputs against its PyTorch reference before it is timed."""

from __future__ import annotations

import csv
import math
import os
import platform
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

OUT_DIR = Path(os.environ.get("FASTATTN_BENCH_OUT", Path(__file__).resolve().parent / "out"))


@dataclass
class Result:
    case: str            # what is measured, e.g. "cross_entropy fwd+bwd 4096x32768 fp32"
    impl: str            # "fastattn[cpu]", "torch eager", "torch.compile", ...
    median_ms: float
    work: float = 0.0    # bytes or FLOPs moved per call, per the case's formula
    unit: str = ""       # "GB/s", "GFLOP/s" or "TFLOP/s"
    peak_mb: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        scale = 1e12 if self.unit == "TFLOP/s" else 1e9
        return self.work / (self.median_ms * 1e-3) / scale if self.work else 0.0


def cpu_peak_mb(fn) -> float | None:
    """Peak of the memory torch's CPU allocator holds during ``fn()`` above what it held before,
    in MB: the profiler's allocation and free events (``profile_memory``) summed in time order,
    every tensor the call allocated including temporaries freed before it returned -- on the
    CPU what ``torch.cuda.max_memory_allocated`` minus the memory before is on a GPU. Unlike the
    process's resident set, it does not depend on what the C library's allocator does with
    freed blocks (one that keeps them, as glibc with large mmap and trim thresholds or a
    preloaded jemalloc does, serves a call after the warm-up from memory already resident: its
    RSS does not rise). Allocations of threads the call starts itself are not seen (fastattn's
    kernels allocate before their parallel loops), nor memory not from torch's allocator; the
    call runs under the profiler, so fastattn's ops go through torch's dispatcher there, as
    when compiled, not their direct eager path (the same tensors). None where this torch's
    profiler gives no such events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except AttributeError:      # (a profiler without the raw event list)
        return None
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):   # (ties: in the order recorded)
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def environment() -> dict:
    from fastattn.train.hostmem import allocator_env, describe_allocator
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        # CPU times of calls that allocate large tensors depend on it (page faults)
        "allocator": describe_allocator(allocator_env()),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "-"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        cpu = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.+)", f.read())
                cpu = m.group(1).strip() if m else cpu
        except OSError:
            pass
        info["device"] = f"{cpu} ({os.cpu_count()} cores)"
    return info


BASELINES = ("torch eager", "torch fused", "torch foreach")


def comparable(r: Result) -> bool:
    """A row that ran (a failed one is NaN) and whose outputs passed their check against the
    reference (``extra["check"]`` says how they did not): only those get or give a ratio."""
    return r.median_ms == r.median_ms and "check" not in r.extra


def _baselines(results: list[Result]) -> dict[str, Result]:
    """Per case, the PyTorch result the others are compared with: eager, else fused, else
    foreach (clip_grad_norm_, whose fused form torch does not have); for a case with none of
    them (attention against the SDPA backends and FlexAttention, decode, GEMMs against cuBLAS)
    the fastest of its PyTorch rows, i.e. every row not fastattn's own."""
    base: dict[str, Result] = {}
    for r in sorted(results, key=lambda r: -r.median_ms):   # the fastest is set last
        if not r.impl.startswith("fastattn") and comparable(r):
            base[r.case] = r
    for name in reversed(BASELINES):
        base.update({r.case: r for r in results if r.impl == name and comparable(r)})
    return base


def ratios(results: list[Result]) -> dict[int, float]:
    """Speedup of each result against its case's baseline (measured in the same run)."""
    base = _baselines(results)
    return {i: base[r.case].median_ms / r.median_ms for i, r in enumerate(results)
            if r.case in base and comparable(r)}


def _notes(r: Result) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in r.extra.items())


def table(results: list[Result]) -> str:
    sp = ratios(results)
    base = _baselines(results)
    rows = [("case", "impl", "median ms", "rate", "peak MB", "speedup vs base", "mem vs base",
             "notes")]
    for i, r in enumerate(results):
        mem_ratio = ""
        # (a ratio of peaks under 1 MB says nothing, and one of 0 would divide by it)
        if r.peak_mb is not None and r.case in base and (base[r.case].peak_mb or 0) >= 1 \
                and comparable(r):
            mem_ratio = f"{r.peak_mb / base[r.case].peak_mb:.2f}x"
        rows.append((r.case, r.impl, f"{r.median_ms:.2f}",
                     f"{r.rate:.3g} {r.unit}" if r.work else "",
                     "" if r.peak_mb is None else f"{r.peak_mb:.0f}",
                     f"{sp[i]:.2f}x" if i in sp else "", mem_ratio, _notes(r)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write(results: list[Result], stem: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.png`` (time and peak memory per case and impl)."""
    out_dir = Path(out_dir or OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    sp = ratios(results)
    base = _baselines(results)
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "impl", "median_ms", "rate", "unit", "peak_mb", "baseline",
                    "speedup_vs_baseline", "notes", *env.keys()])
        for i, r in enumerate(results):
            w.writerow([r.case, r.impl, f"{r.median_ms:.4f}", f"{r.rate:.3f}", r.unit,
                        "" if r.peak_mb is None else f"{r.peak_mb:.1f}",
                        base[r.case].impl if r.case in base else "",
                        f"{sp[i]:.3f}" if i in sp else "", _notes(r), *env.values()])
    png_path = out_dir / f"{stem}.png"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return csv_path, png_path
    cases = list(dict.fromkeys(r.case for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.9 * len(cases)))
    height = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        for ax, attr in zip(axes, ("median_ms", "peak_mb")):
            ys, xs = [], []
            for c, case in enumerate(cases):
                match = [r for r in results if r.case == case and r.impl == impl]
                if match and getattr(match[0], attr) is not None:
                    ys.append(c + j * height)
                    xs.append(getattr(match[0], attr))
            ax.barh(ys, xs, height=height, label=impl)
    for ax, label in zip(axes, ("median time (ms, lower is better)", "peak memory (MB)")):
        ax.set_yticks([c + 0.4 - height / 2 for c in range(len(cases))])
        ax.set_yticklabels(cases, fontsize=8)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"fastattn vs PyTorch — {env['device']}, torch {env['torch']}, {env['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def interleaved(fns: dict, rounds: int, *, before=None, best_of: int = 1,
                rotate: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns`` (name -> callable), timed in interleaved rounds in
    one process: every round calls each function once (or ``best_of`` times, keeping the
    fastest), so drift in a shared machine's speed falls on all of them alike and ratios of
    medians are fair. ``before()``, if given, runs untimed before each timed call (to clear
    gradients, say); ``rotate`` changes which function leads each round (a function that
    always follows another may find the caches or the allocator as the other left them).
    Each function is called twice untimed first (first-call costs: kernel selection, page
    faults of new buffers)."""
    if rounds < 1 or best_of < 1:
        raise ValueError(f"interleaved: rounds and best_of must be >= 1, got {rounds}, {best_of}")
    order = list(fns)
    for name in order:
        for _ in range(2):
            if before is not None:
                before()
            fns[name]()
    times = {name: [] for name in order}
    for r in range(rounds):
        shift = r % len(order) if rotate else 0
        for name in order[shift:] + order[:shift]:
            best = float("inf")
            for _ in range(best_of):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fns[name]()
                best = min(best, time.perf_counter() - t0)
            times[name].append(best)
    return times


# Greatest error, relative to the reference output's greatest magnitude, a row may show, by the
# reference output's dtype. Loose enough for two correct kernels that round in different orders
# (one bf16 gradient differs from another by a few of its last bits), tight enough for a wrong
# mask, scale, index or a skipped term.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def outputs(step, *tensors):
    """Runs ``step`` and returns copies of what it returned and of the gradients it left in
    ``tensors`` (None where it left none)."""
    out = step()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return ([o.detach().clone() for o in outs]
            + [None if t.grad is None else t.grad.detach().clone() for t in tensors])


def against(make_step, fn, reference_fn, setup, *held):
    """The ``outputs`` pair of the CPU benchmarks' ``measure``: for ``fn`` and for
    ``reference_fn``, a callable that runs ``make_step(f)(*setup())`` on fresh arguments and
    returns what it returned and the gradients it left in those arguments that require grad and
    in ``held`` (tensors the step holds itself, such as weights)."""
    def run(f):
        def go():
            args = setup()
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            return outputs(lambda: make_step(f)(*args), *leaves, *held)
        return go
    return run(fn), run(reference_fn)


def relative_errors(got, want) -> list[float]:
    """Per output, max|g - w| / max|w| (inf for a NaN, a shape mismatch, or an output one side
    has and the other lacks; 0 for two Nones)."""
    if len(got) != len(want):
        return [math.inf]
    errors = []
    for g, w in zip(got, want):
        if g is None or w is None:
            errors.append(0.0 if g is w else math.inf)
        elif g.shape != w.shape:
            errors.append(math.inf)
        elif not w.numel():
            errors.append(0.0)
        else:
            g, w = g.float(), w.float()
            diff, scale = (g - w).abs().max().item(), w.abs().max().item()
            errors.append(math.inf if diff != diff else
                          diff / scale if scale else math.inf if diff else 0.0)
    return errors


def check(run, reference=None) -> dict:
    """The ``extra`` entries of a row whose outputs are ``run()`` (called once here) and
    whose reference's are ``reference`` (None: ``run()`` returns both, as a pair): its worst
    relative error, and ``check: FAILED`` when an output's error is past the tolerance of that
    reference output's dtype."""
    try:
        got = run()
        if reference is None:
            got, reference = got
        errors = relative_errors(got, reference)
    except Exception as exc:    # the row is still timed; the failure is its check's verdict
        traceback.print_exc()
        return {"check": f"FAILED ({type(exc).__name__})"}
    verdict = {"err": max(errors, default=0.0)}
    tolerances = [TOLERANCE.get(w.dtype, 0.0) if w is not None else 0.0 for w in reference]
    if len(errors) != len(reference) or any(not e <= tol for e, tol in zip(errors, tolerances)):
        verdict["check"] = "FAILED"
    return verdict


# The AdamW check's scale of the starting values and its weight decay: an update (~lr) stands
# ~1e4 times above the values' fp32 rounding, and the decay (lr * 0.5 * 0.02 a step) is ~1% of it.
ADAM_CHECK_SCALE, ADAM_CHECK_DECAY = 0.02, 0.5


def adam_updates(make, start, steps, dtype, master, reference=False):
    """The outputs an AdamW row is checked by: the steps of ``make(params)`` (an optimizer with
    ``param_groups``) from copies of ``start`` (values of about ``ADAM_CHECK_SCALE``), with the
    gradients ``steps`` (a list of per-step lists), both in ``dtype``, at weight decay
    ``ADAM_CHECK_DECAY``; the outputs are the float32 updates (of the master weights, with
    ``master``; and then the parameters). ``reference``: an fp32 optimizer, run from the same
    values rounded to ``dtype``."""
    params = [p.to(dtype).to(torch.float32 if reference else dtype).clone().requires_grad_()
              for p in start]
    before = [p.detach().float().clone() for p in params]
    opt = make(params)
    for group in opt.param_groups:   # decoupled decay ~1% of the update: a kernel without it fails
        group["weight_decay"] = ADAM_CHECK_DECAY
    for grads in steps:
        for p, grad in zip(params, grads):
            p.grad = grad.to(dtype).to(p.dtype)
        opt.step()
    if not master:
        return [p.detach().float() - b for p, b in zip(params, before)]
    full = [p.detach() if reference else opt.state[p]["master_param"] for p in params]
    return ([f - b for f, b in zip(full, before)]
            + [(f if reference else p.detach()).to(dtype) for f, p in zip(full, params)])



def clip_check(fn, params, grads):
    """A clip_grad_norm_ row's check, on its own first call: ``fn(params, 1.0)`` clips the
    gradients of ``params`` in place; returns (outputs, reference): the norm it returned and the
    first four of its clipped gradients, and the same computed from the gradients before the
    call (the norm in float32 over every gradient, rounded to their dtype like torch's; the
    clipping by ``1 / (norm + 1e-6)``). ``grads``: the gradients, as the call will find them."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                 for g in grads]))
    coef = (1.0 / (norm + 1e-6)).clamp(max=1.0)
    reference = [norm.to(grads[0].dtype)] + [(g.float() * coef).to(g.dtype) for g in grads[:4]]
    total = fn(params, 1.0)
    return [total] + [p.grad.clone() for p in params[:4]], reference
