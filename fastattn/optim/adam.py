"""Drop-in fused Adam and AdamW.

Same constructor, ``step(closure)``, ``zero_grad``, ``add_param_group`` and ``state_dict`` layout
as ``torch.optim.Adam``/``AdamW`` (per-parameter ``step``, ``exp_avg``, ``exp_avg_sq`` and, with
amsgrad, ``max_exp_avg_sq``), so a checkpoint of either loads into the other. Added:

* ``master_weights=True``: fp16/bf16 parameters get an fp32 copy (state key ``master_param``)
  that the step updates; the parameter receives its rounding.
* ``moment_dtype``: ``torch.float32`` (default) or ``torch.bfloat16`` moments.
* ``torch.amp.GradScaler`` support without a host sync: ``scaler.step(opt)`` hands the scale
  and the inf flag to the kernel, which unscales on the fly and changes nothing (step counts
  included) when the flag is set. As with torch's fused optimizers, the gradients are left
  unscaled after a taken step and as they were, scaled, after a skipped one (torch's
  foreach and single-tensor ones, which GradScaler unscales beforehand, leave the finite
  gradients of a skipped step unscaled).

Parameters of any layout are stepped (a parameter that is not contiguous, e.g. channels_last,
through a contiguous copy). float64 and complex parameters, which the float32 kernels do not
serve, are stepped by torch.optim's own single-tensor Adam(W), with their moments in the
parameter's dtype as torch keeps them. Checkpoints of older torch releases (integer ``step``, groups
without ``maximize`` and the later options) load like they do into torch.optim. A master copy
that no longer rounds to its parameter (the parameter was changed outside this optimizer, or
the checkpoint went through an optimizer without master weights) is re-seeded from the
parameter at the first step after ``load_state_dict``; one that the parameter's group does not
keep (``master_weights`` off, or a parameter that is not fp16/bf16) is dropped there.

Each step is one ``fastattn::adam_step_`` call per (device, dtype policy, step count) bucket of
tensors; step counts and learning rates live on the device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.optim.adam as _torch_adam
import torch.optim.adamw as _torch_adamw
from torch import Tensor

from .. import _eager
from ..ops import adam as _adam_op
from ..ops._args import real_number

_MOMENT_DTYPES = (torch.float32, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels'; others: torch's


def _is_dtensor(t) -> bool:
    """Whether t is a torch.distributed DTensor (FSDP2's parameters), without importing
    torch.distributed where it is not built."""
    cls = type(t)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def _check_hyperparameters(name: str, lr, betas, eps, weight_decay, where: str = "",
                           read_tensors: bool = False) -> None:
    """A clear error for a value the kernels cannot step with: at construction, and for every
    group before a step changes anything (a group edited since, or added with its own values).
    The values of ``lr`` and ``betas`` given as tensors are read only if ``read_tensors`` (at
    construction: at each step a read would sync with the device, and under torch.compile it
    would be data-dependent control flow)."""
    def number(what, value):
        value = real_number(name, what + where, value)
        if not 0.0 <= value < math.inf:
            raise ValueError(f"{name}: invalid {what} {value}{where} (expected a finite number "
                             f">= 0)")
        return value

    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{name}: lr as a Tensor must have one element, got shape "
                             f"{tuple(lr.shape)}{where}")
        if read_tensors and lr.device.type != "meta" and not 0.0 <= float(lr) < math.inf:
            raise ValueError(f"{name}: invalid learning rate {float(lr)}{where} (expected a "
                             f"finite number >= 0)")
    else:
        number("learning rate", lr)
    number("eps", eps)
    number("weight_decay", weight_decay)
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"{name}: betas{where} must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and (not read_tensors or beta.device.type == "meta"):
            continue
        if not 0.0 <= number(f"beta parameter at index {i}", beta) < 1.0:
            raise ValueError(f"{name}: invalid beta parameter at index {i}: {beta}{where} "
                             "(expected 0 <= beta < 1)")


def _moment_dtype(group: dict) -> torch.dtype:
    value = group["moment_dtype"]  # a name; torch.dtype in groups saved before it was one
    return value if isinstance(value, torch.dtype) else getattr(torch, value)


class Adam(torch.optim.Optimizer):
    """Fused ``torch.optim.Adam`` (``decoupled_weight_decay=True`` gives AdamW).

    ``foreach`` and ``fused`` are accepted for signature compatibility and ignored (this
    optimizer is always fused); ``capturable`` is always true in effect (step and lr are device
    tensors); ``differentiable=True`` is not supported.
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step()

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, *, foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 master_weights: bool = False, moment_dtype: torch.dtype = torch.float32):
        name = type(self).__name__
        _check_hyperparameters(name, lr, betas, eps, weight_decay, read_tensors=True)
        if differentiable:
            raise NotImplementedError(f"{name}: differentiable=True is not supported by the "
                                      "fused kernels; use torch.optim")
        if foreach and fused:
            raise RuntimeError(f"{name}: `fused` and `foreach` cannot be `True` together "
                               "(as in torch.optim; both are accepted and ignored here: the "
                               "step is always fused)")
        if moment_dtype not in _MOMENT_DTYPES:
            raise ValueError(f"{name}: moment_dtype must be torch.float32 or torch.bfloat16, "
                             f"got {moment_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=False, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay,
                        master_weights=master_weights,
                        # a name, not a torch.dtype: state dicts stay plain data (torch's
                        # distributed checkpointing refuses dtype objects in param_groups)
                        moment_dtype=_DTYPE_NAMES[moment_dtype])
        super().__init__(params, defaults)
        # Parameters whose step counts are known to be equal share a key, so a step needs no
        # device-to-host read to group them: ("v", n) for a count read from the device (state
        # creation or loading), and an integer for a class of params that stepped together (or
        # were skipped together by GradScaler). A class that steps whole keeps its integer, so
        # the keys are the same from step to step (torch.compile guards on them: a key that
        # changed every step recompiled the step every time); a part of a class that steps
        # without the rest gets a fresh integer, and different histories never merge.
        self._step_keys: dict[Tensor, Any] = {}
        self._key_sizes: dict[Any, int] = {}   # parameters per key
        # (step tensor, its version) as the last eager step left them, per parameter: a count
        # that a user replaced or changed in place since (opt.state[p] = {...}, a reset of the
        # moments) is read again instead of being trusted to equal its class's. A compiled step
        # reads no versions; it sets _compiled_since[0], and the next eager step takes the
        # versions as they are (the compiled steps' own increments) without reading counts.
        # Not seen: changes made between compiled steps, and writes that bypass the version
        # counter (through .data, or numpy).
        self._step_seen: dict[Tensor, tuple] = {}
        self._compiled_since = [False]
        self._fresh_key = [0]  # in a list: dynamo (torch 2.5) cannot trace an int attribute's +=
        # parameters whose loaded master copy is checked against them at their next step
        self._check_master: set = set()

    def add_param_group(self, param_group: dict) -> None:
        """torch's, refusing a group that lists a parameter twice: torch.optim only warns
        (and steps it twice), where one fused call would read and write its memory as two
        tensors at once."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (Tensor, set)):
            params = list(params)     # a generator is consumed once: torch gets the list
            param_group = {**param_group, "params": params}
            seen: dict[int, int] = {}
            for i, p in enumerate(params):
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter group lists the same "
                                     f"parameter twice (at {seen[id(p)]} and {i}); list each "
                                     f"parameter once")
                seen[id(p)] = i
        if isinstance(param_group, dict) and hasattr(self, "defaults"):
            merged = {**self.defaults, **param_group}
            _check_hyperparameters(type(self).__name__, merged["lr"], merged["betas"],
                                   merged["eps"], merged["weight_decay"],
                                   f" in param_groups[{len(self.param_groups)}]",
                                   read_tensors=True)
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_step_keys", {})
        if "_key_sizes" not in self.__dict__:    # pickled before the sizes were kept
            self._key_sizes = {}
            for key in self._step_keys.values():
                self._key_sizes[key] = self._key_sizes.get(key, 0) + 1
        fresh = self.__dict__.get("_fresh_key", 0)  # an int before
        self._fresh_key = fresh if isinstance(fresh, list) else [fresh]
        self.__dict__.setdefault("_check_master", set())
        self._step_seen = {}     # (copies hold other tensors: every count is read again)
        self._compiled_since = [False]
        self._fill_group_defaults()
        for p, st in self.state.items():  # torch < 1.12 kept the step count as a number
            if "step" in st and not isinstance(st["step"], Tensor):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32,
                                          device=getattr(p, "device", None))

    def _fill_group_defaults(self) -> None:
        """Options a group saved by an older torch.optim (or by torch.optim at all) lacks."""
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in ("lr", "betas", "eps", "weight_decay", "amsgrad"):
                    group.setdefault(key, value)
            group.setdefault("amsgrad", False)     # (as torch.optim.Adam's __setstate__)

    # -- state -------------------------------------------------------------------------------

    def _init_state(self, p: Tensor, group: dict, check: bool = False) -> dict:
        """p's state, created if missing. ``check`` (eager steps): a step count changed outside
        the optimizer since its last step loses its key, and is read again."""
        state = self.state[p]
        moment = _moment_dtype(group) if p.dtype in _PARAM_DTYPES else p.dtype
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment,
                                                   memory_format=torch.contiguous_format)
            self._set_key(p, ("v", 0))
        elif check and p in self._step_keys:
            step = state["step"]
            seen = self._step_seen.get(p)
            if seen is None or seen[0] is not step or seen[1] != step._version:
                self._set_key(p, None)    # changed outside the optimizer: read it again
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=moment,
                                                       memory_format=torch.contiguous_format)
        if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16):
            master = state.get("master_param")
            if master is None or (p in self._check_master
                                  and not torch.equal(master.to(p.dtype), p.detach())):
                state["master_param"] = p.detach().to(
                    torch.float32, memory_format=torch.contiguous_format, copy=True)
        elif "master_param" in state:
            # a master this group does not keep (master_weights off, or a parameter that is not
            # fp16/bf16, e.g. loaded from a bf16 run into an fp32 model): the parameter is the
            # weights, and a step must not go on from the stale copy
            del state["master_param"]
        self._check_master.discard(p)
        if p not in self._step_keys:  # loaded (or changed) state: read its count once
            step = state["step"]
            if step.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"{type(self).__name__}: a parameter's step count was loaded or changed "
                    f"outside the optimizer, and reading it is not possible during CUDA graph "
                    f"capture; take one step outside the capture first")
            self._set_key(p, ("v", int(step.item())))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a fastattn or torch.optim Adam/AdamW state dict.

        torch's loader casts every state tensor to its parameter's dtype; fp32 moments and
        master weights of low-precision parameters are restored at full precision after it.
        """
        # torch's hooks run around the whole load, as its loader runs them: the pre-hooks
        # before the state restored below is taken, the post-hooks after it is restored (the
        # loader itself runs without them)
        pre_hooks = getattr(self, "_optimizer_load_state_dict_pre_hooks", None)
        post_hooks = getattr(self, "_optimizer_load_state_dict_post_hooks", None)
        state_dict = state_dict.copy()      # (as torch's loader: the hooks get a copy)
        for hook in list((pre_hooks or {}).values()):
            returned = hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        originals = {pid: dict(s) for pid, s in state_dict["state"].items()}
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        if pre_hooks:
            self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        if post_hooks:
            self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(state_dict)
        finally:
            if pre_hooks:
                self._optimizer_load_state_dict_pre_hooks = pre_hooks
            if post_hooks:
                self._optimizer_load_state_dict_post_hooks = post_hooks
        self._restore_loaded_state(originals, saved_ids)
        for hook in list((post_hooks or {}).values()):
            hook(self)

    def _restore_loaded_state(self, originals: dict, saved_ids: list) -> None:
        """The state tensors as saved (torch's loader cast them to the parameters' dtypes)."""
        self._fill_group_defaults()
        params = [p for g in self.param_groups for p in g["params"]]
        groups = {p: g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(saved_ids, params):
            if pid not in originals:
                continue
            group, state = groups[p], self.state[p]
            for key, value in originals[pid].items():
                if key == "step" and not isinstance(value, Tensor):  # torch < 1.12: a number
                    value = torch.tensor(float(value))
                if not isinstance(value, Tensor):
                    continue
                dtype = (torch.float32 if key in ("step", "master_param") else
                         _moment_dtype(group) if p.dtype in _PARAM_DTYPES else p.dtype)
                state[key] = value.to(device=p.device, dtype=dtype,
                                      memory_format=torch.contiguous_format, copy=True)
            self._set_key(p, None)
            self._check_master.add(p)

    # -- step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        name = type(self).__name__
        for i, group in enumerate(self.param_groups):   # before any group steps: all or none
            _check_hyperparameters(name, group["lr"], group["betas"], group["eps"],
                                   group["weight_decay"], f" in param_groups[{i}]")
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
        compiling = _eager._is_compiling()
        if compiling:
            self._compiled_since[0] = True
        elif self._compiled_since[0]:
            # after compiled steps, whose increments moved every version: take them as seen
            self._compiled_since[0] = False
            for p, state in self.state.items():
                step = state.get("step") if p in self._step_keys else None
                if isinstance(step, Tensor):
                    self._step_seen[p] = (step, step._version)
        for group in self.param_groups:
            self._step_group(group, grad_scale, found_inf, not compiling)
        return loss

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        """The tensor the kernel updates: a DTensor's local shard (FSDP2), else the tensor.

        Adam is elementwise, so each rank stepping its own shard of the parameter, gradient and
        moments is the whole step; the state stays DTensor for distributed checkpoints."""
        return t.to_local() if _is_dtensor(t) else t

    def _step_group(self, group: dict, grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor], eager: bool = False) -> None:
        buckets: dict[tuple, list] = {}
        others: dict[torch.device, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.dtype not in _PARAM_DTYPES:  # float64, complex
                others.setdefault(p.device, []).append(p)
                continue
            state = self._init_state(p, group, eager)
            key = (p.device, p.dtype, "master_param" in state, self._step_keys[p])
            buckets.setdefault(key, []).append(p)
        beta1, beta2 = group["betas"]
        for (device, _, has_master, _), params in buckets.items():
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device.type == "cpu" and device.type != "cpu":
                lr = float(lr)      # a CPU read: copying it to the device would sync the host
            # (scalars, 0-dim: a (1,)-shaped lr, or GradScaler's (1,) scale and flag, must not
            # broadcast a 0-dim parameter's update to (1,))
            lr = (lr.to(device=device, dtype=torch.float32).reshape(()) if isinstance(lr, Tensor)
                  else torch.full((), lr, dtype=torch.float32, device=device))
            inv_scale = inf = None
            if grad_scale is not None:
                inv_scale = grad_scale.to(device=device,
                                          dtype=torch.float32).reshape(()).reciprocal()
            if found_inf is not None:  # GradScaler sums the flags of all devices: 0 or >= 1
                inf = found_inf.to(device=device).reshape(()).ne(0).to(torch.float32)
            local = self._local
            # the kernels step contiguous tensors (moments and master copies are kept so); a
            # parameter of another layout is stepped through a contiguous copy
            targets = [local(p) for p in params]
            work = [t.contiguous() for t in targets]
            grads = [local(p.grad) for p in params]
            _eager.call(
                _adam_op.adam_step_, work, [g.contiguous() for g in grads],
                [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states],
                [local(s["max_exp_avg_sq"]) for s in states] if group["amsgrad"] else [],
                [local(s["master_param"]) for s in states] if has_master else [],
                steps[0], lr, float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), bool(group["decoupled_weight_decay"]),
                bool(group["amsgrad"]), bool(group["maximize"]), inv_scale, inf)
            for t, w in zip(targets, work):
                if w is not t:
                    t.copy_(w)
            if inv_scale is not None:
                # leave the gradients unscaled, as torch's optimizers do under GradScaler (its
                # unscale_, or the fused kernels' write-back); untouched when the step is skipped
                factor = inv_scale if inf is None else torch.where(inf.bool(), 1.0, inv_scale)
                torch._foreach_mul_(grads, factor)
            if inf is not None:  # a skipped step does not count
                torch._foreach_sub_(steps, [inf] * len(steps))
            self._stepped_together(params, steps if eager else None)
        for device, params in others.items():
            self._step_with_torch(group, device, params, grad_scale, found_inf, eager)

    def _step_with_torch(self, group: dict, device: torch.device, params: list,
                         grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                         eager: bool = False) -> None:
        """float64 / complex parameters on one device: torch.optim's single-tensor Adam(W)
        (torch computes them in their own dtype, complex ones through view_as_real). That
        implementation takes no GradScaler arguments, so the scaler's part is done here: a
        skipped step (one host read of the inf flag) changes nothing, a taken one unscales the
        gradients first, as the fused path leaves them."""
        if found_inf is not None and bool(found_inf.ne(0).any()):
            return
        grads = [p.grad for p in params]
        if grad_scale is not None:
            inv = grad_scale.to(device=device, dtype=torch.float32).reshape(()).reciprocal()
            for g in grads:
                g.mul_(inv)
        states = [self._init_state(p, group, eager) for p in params]
        beta1, beta2 = group["betas"]
        fn = _torch_adamw.adamw if group["decoupled_weight_decay"] else _torch_adam.adam
        fn(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
           [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
           [s["step"] for s in states], foreach=False,
           capturable=device.type != "cpu",   # the step counts live on the device (no sync)
           has_complex=any(p.is_complex() for p in params), amsgrad=bool(group["amsgrad"]),
           beta1=float(beta1), beta2=float(beta2), lr=group["lr"],
           weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
           maximize=bool(group["maximize"]))
        self._stepped_together(params, [s["step"] for s in states] if eager else None)

    def _set_key(self, p: Tensor, key) -> None:
        """p's step-count key (None: forget it), keeping the count of params per key."""
        old = self._step_keys.pop(p, None)
        if old is not None:
            left = self._key_sizes[old] - 1
            if left:
                self._key_sizes[old] = left
            else:
                del self._key_sizes[old]
        if key is not None:
            self._step_keys[p] = key
            self._key_sizes[key] = self._key_sizes.get(key, 0) + 1

    def _stepped_together(self, params: list, steps: Optional[list] = None) -> None:
        """params took this step together (their step counts are equal): they keep their
        integer key if they are all of its class, else they get a fresh one. ``steps`` (eager
        steps): their step tensors, whose versions are recorded as seen."""
        if steps is not None:
            for p, step in zip(params, steps):
                self._step_seen[p] = (step, step._version)
        key = self._step_keys[params[0]]
        if (isinstance(key, int) and self._key_sizes.get(key) == len(params)
                and all(self._step_keys[p] == key for p in params)):
            return
        self._fresh_key[0] += 1
        for p in params:
            self._set_key(p, self._fresh_key[0])


class AdamW(Adam):
    """Fused ``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, params: Iterable, lr: Union[float, Tensor] = 1e-3,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 master_weights: bool = False, moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         moment_dtype=moment_dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        # as torch.optim.AdamW: a loaded group (say, an Adam checkpoint's) stays decoupled
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
