"""Fused GPU steps (Triton) for the coordinate-wise rules, L2O-DM and RNNprop.

The torch path of ``LearnedOptimizer.step`` evaluates the rule module over chunks of coordinates, a few
dozen small kernels per chunk. On a GPU the floor of a step is its memory traffic, so the fused path does
the whole step in one kernel launch per param group (per combination of parameter, gradient and state
dtypes), whatever the number of tensors, between two small ones (the NaN/Inf check before, the step counters
after):

* **Host, per step.** One int64 table: the data pointers of the rule's own weight tensors (read at call
  time: no copy of the weights exists that could go stale), then one row per tensor (gradient, parameter,
  ``rnn`` state, ``mv`` state and ``step`` pointers, numel, first block), copied to the device in one
  transfer. A block map (program -> tensor, int32; cached per layout) lets program ``pid`` find its tensor
  with one load. Each tensor's ``step`` lives on its device (as in torch's fused optimizers); the kernel reads
  it and computes RNNprop's bias corrections ``1 - beta^step = 1 - exp2(step * log2(beta))`` per tensor (each
  tensor its own step count).
  The scan of a group (checks, pointers, block map) is recorded as its plan. From the group's second fused
  step on, the plan takes the whole step in one pass: the group's list, its gradients (type, contiguity,
  pointers, alignment), the parameter pointers, the state tensors and the state dict are compared with the
  recorded ones as whole lists iterated in C (``map``), and the gradient filtering, the state initialisation
  and the per-tensor dict lookups of the full path are skipped; anything changed sends the step back to the
  full path, which scans again and records a new plan. Host cost (``benchmarks/step_host.py``, launches
  stubbed, on this project's 2-core CPU; ``benchmarks/results/step_host.json``): 0.51 ms per step for the 864
  tensors of the 1M "many" layout (0.59 µs per tensor; the bare walk ``[p.grad for p in params]`` costs
  0.06 µs per tensor), 0.05 ms for one matrix (0.93 ms for the 864 tensors when every step re-checked a cached
  scan tensor by tensor).
* **No host sync.** Non-finite gradients are found on the device: a launch over the same blocks flags each
  tensor with a NaN or Inf in its gradient, the step masks every load and store of a flagged tensor (its
  parameter, state and ``step`` stay as they were), and a one-program launch then advances the other
  tensors' steps, counts the flagged ones and clears the flags. The count goes to pinned host memory behind
  the step and a later ``step()`` turns it into the ``RuntimeWarning`` once it has arrived, so ``step()``
  never waits for the GPU (the torch path syncs once per param group for its check; ``nonfinite="raise"``
  checks on the host on both paths). A tensor skipped at its very first step keeps its freshly initialised
  state at step 0, which is what the torch path creates at its next step.
* **One program** takes BLOCK (default 64) consecutive coordinates of one tensor. It loads the gradient
  (any of fp32/bf16/fp16; negated for ``maximize``) and runs the preprocessing (DM: LogAndSign with k=5;
  RNNprop: the Adam moments m, v, bias-corrected features, Linear(2, 20) + ELU), then for each LSTM layer
  loads h and c as [BLOCK, 32] tiles of the feature-major (80, n) state -- row r of coordinate j is at
  ``r * n + j``, so every row load is coalesced along the coordinates -- computes the four gates as
  ``tl.dot([BLOCK, 32], [32, 32])`` products (hidden 20 padded to 32 with masked loads, padding lanes stay
  exactly 0; DM's 2-feature first layer uses outer products), accumulates in fp32, and writes the new h, c
  back in the state dtype (float32, bfloat16 or float16; maths always in fp32). The head (Linear(20, 1),
  tanh for RNNprop, x0.01) gives the update, which is rounded to the parameter dtype and added in place,
  ``p += lr * update``. Sigmoid is ``1 / (1 + exp(-x))``, the LSTM tanh the rule's own ``2 sigmoid(2x) - 1``;
  RNNprop's output tanh and the ELU use an expm1 that is exact near 0.
* **Traffic per coordinate** (fp32 state): read gradient 4 B, parameter 4 B, state 320 B (RNNprop +8 B of
  m, v), write state 320 B (+8) and parameter 4 B: ~652 B for DM, ~668 B for RNNprop; bfloat16 state halves
  the state part (~332 / 340 B). The NaN/Inf check reads the gradient once more (+4 B, under 1 %). Weights
  (~21 KB for DM, ~27 KB for RNNprop) are read once per program and stay in L1/L2.
* When every tensor of a launch has 16-byte aligned pointers and a numel divisible by 4, the launch is
  specialised (``VEC=4``) so loads and stores of the state rows are 128-bit vectors; other tensors go into
  a second launch with scalar accesses.
* ``tl.dot`` uses ``input_precision="tf32x3"`` by default on the GPU (three TF32 tensor-core products, close
  to fp32 accuracy); ``LEARNED_OPTIM_TRITON_PRECISION=ieee`` gives plain fp32 FMA, ``tf32`` the fast, lossy
  one. ``LEARNED_OPTIM_TRITON_BLOCK`` / ``_WARPS`` / ``_MAXNREG`` override BLOCK (64), num_warps (4) and the
  register cap per thread (none).
  Compiled for sm_90a without a GPU (``lstm.compile_for``, ptxas of the Triton wheel; every variant and
  launch configuration in ``benchmarks/kernel_resources.py``), with Triton 3.8.0 the default fp32 variant
  uses 255 registers per thread (so at most two programs of 4 warps per SM) with 48 B (DM) / 148 B (RNNprop)
  of spills per thread and 16 KB of shared memory (Triton 3.6.0: 52 / 68 B, 8 / 16 KB); "tf32" needs 168 /
  178 registers and no spills but is not accurate enough; "ieee" spills kilobytes. The default suite
  compiles two variants this way, which the interpreter cannot check.
  ``benchmarks/step.py --triton-configs`` times other launch configurations side by side;
  ``lstm.precompile()`` fills Triton's cache for every dtype variant in parallel processes.

Dispatch (``backend=`` of ``LearnedOptimizer``): ``"auto"`` uses the kernel for CUDA tensors when Triton is
importable and the torch path otherwise; ``"torch"`` always the torch path; ``"triton"`` always the kernel
(on CPU tensors only under Triton's interpreter, ``TRITON_INTERPRET=1`` set before Triton is imported; the
interpreter cannot follow the table's device pointers, so it runs CPU tensors only). L2O-Scale (not
coordinate-wise) always takes the torch path. ``"compile"`` is the torch path with the rule module under
``torch.compile`` (``learned_optim.optimizer.COMPILE_BACKEND``, inductor: generated C++ on the CPU, Triton on a
GPU), for L2O-DM and RNNprop on any device; it compiles at the first steps. Tensors the kernel cannot take in
place (tensor subclasses such as DTensor, float64, state that is not a contiguous tensor on the parameter's
device) are stepped on the torch path in the same ``step()``; parameters with gaps (e.g. a strided slice) go
through one update buffer, as on the torch path. The state layout is the torch path's, so state dicts move
freely between backends. Before a freshly scanned plan's first launch every kernel variant it needs is
compiled and loaded (Triton's warm-up): a GPU that cannot run one (TF32 products or bfloat16 before Ampere,
too little shared memory) is found before anything is written; then ``"auto"`` warns once and steps that
device's tensors on the torch path, and ``"triton"`` raises.

**The LSTM cell of the meta-trainer** (``kernels.cell``). Outside the optimizer, the rules run as plain modules:
``meta_train``'s differentiable unroll and its validation rollouts (and any code that calls a rule directly). There
``rules.base.lstm_cell`` hands the element-wise part of every LSTM cell (gates -> h', c') on float32 CUDA tensors
to two Triton kernels through an autograd Function, one forward and one backward, instead of ~22 torch kernels
(3.5x less memory traffic for the cell; ``benchmarks/meta_traffic.py`` counts a whole meta-training step). Not
inside ``torch.compile`` (inductor fuses the plain maths itself), nor in the optimizer's torch path, which stays
torch's maths. ``kernels.cell_kernel("off")`` (a context manager) or ``LEARNED_OPTIM_CELL_KERNEL=off`` turns them
off; a GPU that cannot compile them gets the plain maths with one warning.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "compile")
_INTERPRET_ON = ("1", "true", "yes", "on")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is "not available", not a crash of every step()
        return False
    return True


def interpreter_enabled() -> bool:
    """True when the kernels run (or will run) under Triton's CPU interpreter."""
    module = _loaded_module()
    if module is not None:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(module._lstm_step_kernel, InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _INTERPRET_ON


def _loaded_module():
    import sys

    return sys.modules.get(f"{__name__}.lstm")


def _module():
    from . import lstm

    return lstm


def _has_kernel(rule) -> bool:
    return rule.name in ("dm", "rnnprop") and rule.coordinatewise


def check_backend(backend: str, rule, params) -> None:
    """Validate ``backend=`` when the optimizer is built (clear ValueErrors for impossible requests)."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (use 'auto', 'torch', 'triton' or 'compile')")
    if backend == "compile" and not rule.coordinatewise:
        raise ValueError(f"backend='compile' compiles the coordinate-wise rules (L2O-DM, RNNprop), not "
                         f"{rule.name!r}; use backend='auto' or 'torch'")
    if backend != "triton":
        return
    if not _has_kernel(rule):
        raise ValueError(f"backend='triton': there is no fused kernel for the {rule.name!r} rule (L2O-DM and RNNprop "
                         "only); use backend='auto' or 'torch'")
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package, which does not import here; use "
                         "backend='auto' or 'torch'")
    devices = {p.device.type for p in params}
    interp = interpreter_enabled()
    if devices - {"cuda"} and not interp:
        raise ValueError(f"backend='triton' runs CUDA tensors (got {sorted(devices - {'cuda'})}); on the CPU only under "
                         "Triton's interpreter (TRITON_INTERPRET=1 set before importing triton). Use backend='torch'")
    if "cuda" in devices and interp:
        raise ValueError("backend='triton' under TRITON_INTERPRET=1 runs CPU tensors only (the interpreter cannot "
                         "follow device pointers); unset TRITON_INTERPRET for CUDA tensors")


def use_kernel(backend: str, rule, device: torch.device) -> bool:
    """Whether a param group on ``device`` takes the fused kernel (raises RuntimeError when forced and impossible)."""
    if backend in ("torch", "compile") or not rule.coordinatewise:
        return False
    if backend == "auto":
        if device.type != "cuda" or not _has_kernel(rule) or not triton_available() or interpreter_enabled():
            return False
        return _module().unsupported_reason(rule, device) is None
    if not triton_available():
        raise RuntimeError("backend='triton': the triton package does not import here")
    interp = interpreter_enabled()
    if device.type == "cuda" and interp:
        raise RuntimeError("backend='triton' under TRITON_INTERPRET=1 runs CPU tensors only; unset TRITON_INTERPRET "
                           "for CUDA tensors")
    if device.type != "cuda" and not interp:
        raise RuntimeError(f"backend='triton' runs CUDA tensors, got {device.type} tensors (on the CPU only under "
                           "TRITON_INTERPRET=1); use backend='torch' or 'auto'")
    reason = _module().unsupported_reason(rule, device)
    if reason is not None:
        raise RuntimeError(f"backend='triton': {reason}")
    return True


def lstm_step(rule, params, state, *, lr: float, maximize: bool, flat_pair, cache: dict, group_params) -> tuple:
    """Run the fused L2O-DM / RNNprop step on ``params`` (the tensors of the group ``group_params`` with a
    gradient) from a fresh scan, and record the group's plan for :func:`fast_step`; returns the tensors left for
    the torch path and the device count of tensors skipped for a non-finite gradient (None when it launched
    nothing)."""
    return _module().lstm_step(rule, params, state, lr=lr, maximize=maximize, flat_pair=flat_pair, cache=cache,
                               group_params=group_params)


def kernel_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the fused path's "this GPU cannot compile or load a kernel variant" (raised before
    anything was written), without importing Triton for the question."""
    module = _loaded_module()
    return module is not None and isinstance(exc, module.KernelUnavailable)


def fast_step(rule_on, group_params, state, *, lr: float, maximize: bool, cache: dict):
    """The next step of a group through its recorded fast plan, or None when the full path must run (see
    ``lstm.fast_step``). Never imports Triton: without a recorded plan there is nothing to do."""
    if not any(k[0] == "fast" for k in cache):
        return None
    return _module().fast_step(rule_on, group_params, state, lr=lr, maximize=maximize, cache=cache)


# ------------------------------------------------------------------------------ the LSTM cell (kernels.cell)
#: where ``rules.base.lstm_cell`` runs its element-wise part through the fused cell kernels: "auto" (CUDA tensors,
#: when Triton imports), "off", or "on" (also CPU tensors, under Triton's interpreter: for tests)
CELL_MODES = ("auto", "off", "on")


def _cell_mode_from_env() -> str:
    mode = os.environ.get("LEARNED_OPTIM_CELL_KERNEL", "auto").strip().lower() or "auto"
    if mode not in CELL_MODES:
        warnings.warn(f"LEARNED_OPTIM_CELL_KERNEL={mode!r} is not one of {CELL_MODES}; using 'auto'", RuntimeWarning,
                      stacklevel=2)
        return "auto"
    return mode


_cell_mode: contextvars.ContextVar[str] = contextvars.ContextVar("learned_optim_cell_kernel",
                                                                 default=_cell_mode_from_env())
_cell_off: set[torch.device] = set()  # devices whose GPU could not compile the cell kernels (warned once)
_cell_checked: set[torch.device] = set()  # devices where they compiled and loaded


@contextlib.contextmanager
def cell_kernel(mode: str):
    """Within the block, ``lstm_cell`` uses the fused cell kernels per ``mode`` ("auto", "off" or "on"); the
    default comes from ``$LEARNED_OPTIM_CELL_KERNEL`` (else "auto")."""
    if mode not in CELL_MODES:
        raise ValueError(f"cell kernel mode must be one of {CELL_MODES}, got {mode!r}")
    token = _cell_mode.set(mode)
    try:
        yield
    finally:
        _cell_mode.reset(token)


def cell_on_cpu() -> bool:
    """Whether CPU tensors take the cell kernels too (mode "on": under Triton's interpreter)."""
    return _cell_mode.get() == "on"


def fused_cell(gates: torch.Tensor, c: torch.Tensor):
    """``(h', c')`` of an LSTM cell from its gates' pre-activations ``gates`` (4H, N) and cell state ``c`` (H, N)
    through the fused kernels (:mod:`learned_optim.kernels.cell`), or None where they do not apply: mode "off",
    inside ``torch.compile`` (inductor fuses the plain maths itself), no Triton, tensors that are not plain
    float32 ones of the expected layout on a CUDA device (on the CPU: mode "on" under the interpreter), under
    ``torch.func`` transforms, or a GPU that cannot compile them (warned once)."""
    mode = _cell_mode.get()
    if mode == "off" or torch.compiler.is_compiling():
        return None
    device = gates.device
    if device.type == "cuda":
        if device in _cell_off or not triton_available() or interpreter_enabled():
            return None
    elif not (device.type == "cpu" and mode == "on" and triton_available() and interpreter_enabled()):
        return None
    if (type(gates) is not torch.Tensor or type(c) is not torch.Tensor or gates.dtype is not torch.float32
            or c.dtype is not torch.float32 or c.device != device or c.dim() != 2 or gates.dim() != 2
            or gates.shape[0] != 4 * c.shape[0] or gates.shape[1] != c.shape[1] or c.numel() == 0
            or not gates.is_contiguous()
            or c.stride(1) != 1 or _functorch_wrapped(gates) or _functorch_wrapped(c)):
        return None
    from . import cell

    if device.type == "cuda" and device not in _cell_checked:
        try:
            cell.check_compiles(gates, c)
        except Exception as exc:  # noqa: BLE001 -- whatever Triton raises: the plain maths instead
            _cell_off.add(device)
            warnings.warn(f"learned_optim: the fused LSTM cell kernels cannot run on {device} "
                          f"({_module().first_line(exc)}); using the plain torch maths there (same results, more "
                          "memory traffic). LEARNED_OPTIM_CELL_KERNEL=off silences this", RuntimeWarning, stacklevel=3)
            return None
        _cell_checked.add(device)
    return cell.FusedCell.apply(gates, c)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


__all__ = ["BACKENDS", "CELL_MODES", "cell_kernel", "cell_on_cpu", "check_backend", "fast_step", "fused_cell",
           "interpreter_enabled", "kernel_unavailable", "lstm_step", "triton_available", "use_kernel"]
