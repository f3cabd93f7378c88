"""Shared benchmark helpers: CPU peak-memory measurement, result table, CSV and PNG output, and
the check of each row's outputs against its PyTorch reference before it is timed."""

from __future__ import annotations

import csv
import math
import os
import traceback
import platform
import re
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


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_mb(fn) -> float | None:
    """Peak resident memory added while ``fn()`` runs, in MB (Linux only, else None).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current
    RSS, so VmHWM after the call minus RSS before it is the call's peak footprint: every tensor it
    allocated and touched, including temporaries freed before it returned. None too where the
    allocator keeps freed blocks (``hostmem.blocks_kept``): after the warm-up calls, this one
    would reuse them and read near 0.
    """
    from fastattn.train.hostmem import allocator_env, blocks_kept
    if blocks_kept(allocator_env()):
        fn()
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return max(0.0, (_status_kb("VmHWM") - before) / 1024)   # (the RSS may have fallen)


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
        # (a ratio of peaks under 1 MB would be of the RSS's noise)
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


def check(run, reference) -> dict:
    """The ``extra`` entries of a row whose outputs are ``run()`` (called once here) and
    whose reference's are ``reference``: its worst relative error, and ``check: FAILED`` when an
    output's error is past the tolerance of that reference output's dtype."""
    try:
        errors = relative_errors(run(), reference)
    except Exception as exc:    # the row is still timed; the failure is its check's verdict
        traceback.print_exc()
        return {"check": f"FAILED ({type(exc).__name__})"}
    verdict = {"err": max(errors, default=0.0)}
    tolerances = [TOLERANCE.get(w.dtype, 0.0) if w is not None else 0.0 for w in reference]
    if len(errors) != len(reference) or any(not e <= tol for e, tol in zip(errors, tolerances)):
        verdict["check"] = "FAILED"
    return verdict


def adam_updates(make, start, steps, dtype, master, reference=False):
    """The outputs an AdamW row is checked by: the steps of ``make(params)`` from copies of
    ``start`` (small values, so that an update stands far above the parameters' rounding), with
    the gradients ``steps`` (a list of per-step lists), both in ``dtype``; the outputs are the
    float32 updates (of the master weights, with ``master``; and then the parameters).
    ``reference``: an fp32 optimizer, run from the same values rounded to ``dtype``."""
    params = [p.to(dtype).to(torch.float32 if reference else dtype).clone().requires_grad_()
              for p in start]
    before = [p.detach().float().clone() for p in params]
    opt = make(params)
    for grads in steps:
        for p, grad in zip(params, grads):
            p.grad = grad.to(dtype).to(p.dtype)
        opt.step()
    if not master:
        return [p.detach().float() - b for p, b in zip(params, before)]
    full = [p.detach() if reference else opt.state[p]["master_param"] for p in params]
    return ([f - b for f, b in zip(full, before)]
            + [(f if reference else p.detach()).to(dtype) for f, p in zip(full, params)])


def clipped(fn, grads):
    """The outputs a clip_grad_norm_ row is checked by: the norm ``fn`` returns over copies of
    ``grads`` (some of the case's) and the gradients it leaves, clipped to norm 1."""
    params = [torch.empty_like(g).requires_grad_() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return [fn(params, 1.0)] + [p.grad for p in params]

