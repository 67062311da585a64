"""The learned optimizers under torch.distributed: DDP and FSDP2 (``fully_shard``) on two CPU processes (gloo).

One ``torchrun --nproc_per_node 2`` launch runs every check (this file is also the worker script: see
``_worker``); each rank writes what it saw, and the tests below compare the ranks with each other and
with a single-process run of the same training: each rank's batch in turn, the gradients averaged as
DDP averages them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import once_per_run
from torch import nn

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
NAMES = ["dm", "rnnprop", "scale"]
STEPS = 20  # DDP runs (bit for bit)
FSDP_STEPS = 10  # FSDP2 runs (to float tolerance: trained L2O-DM amplifies ulp differences step after step)
CHUNK = 16  # FSDP2 runs: small chunks, so shards cut across chunks and tensors share them
WORLD = 2


# ---------------------------------------------------------------------- shared by the workers and the tests
def make_model(seed: int = 0) -> nn.Module:
    """Odd sizes: uneven shards, and a last layer (1 row) whose shard on rank 1 is empty."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(9, 31), nn.Tanh(), nn.Linear(31, 17), nn.Tanh(), nn.Linear(17, 1))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 9, generator=gen)
    return x, x[:, :1] * 0.5 - x[:, 1:2] ** 2 + 0.1 * torch.randn(8, 1, generator=gen)


def make_opt(name: str, params, **kwargs):
    import learned_optim

    cls = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}[name]
    return cls(params, weights=name, **kwargs)


def train(model, opt, steps, rank, first: int = 0) -> None:
    for step in range(first, first + steps):
        x, y = batch(step, rank)
        opt.zero_grad()
        # float(): bf16 outputs under mixed precision; torch 2.11 refuses a bf16/fp32 mse_loss backward
        nn.functional.mse_loss(model(x).float(), y).backward()
        opt.step()


def reference_run(name: str, steps: int = STEPS, **kwargs) -> dict:
    """One process, the same training: the gradient of each rank's batch, divided by the world size and summed."""
    model = make_model()
    opt = make_opt(name, model.parameters(), **kwargs)
    for step in range(steps):
        grads = []
        for rank in range(WORLD):
            model.zero_grad()
            x, y = batch(step, rank)
            nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad / WORLD for p in model.parameters()])
        for p, *gs in zip(model.parameters(), *grads):
            p.grad = sum(gs)
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "state": _plain_state(opt)}


def _plain_state(opt) -> dict:
    return {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
            for i, s in opt.state_dict()["state"].items()}


# ---------------------------------------------------------------------- the worker (run by torchrun)
def _fsdp_model(mesh, seed: int = 0, dtype=torch.float32, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed).to(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


def _local_state(opt) -> dict:
    """This rank's state tensors as stored (plain tensors; a DTensor's coordinates are its local shard's)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}


def _ddp_checks(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name in NAMES:
        model = DistributedDataParallel(make_model())
        opt = make_opt(name, model.parameters())
        train(model, opt, STEPS, rank)
        out[name] = {"params": [p.detach().clone() for p in model.parameters()], "state": _plain_state(opt)}
    return out


def _fsdp_checks(rank: int, mesh) -> dict:
    out = {}
    for name in NAMES:
        model = _fsdp_model(mesh)
        opt = make_opt(name, model.parameters(), chunk_size=CHUNK)
        train(model, opt, FSDP_STEPS, rank)
        full_state = {i: {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in s.items()
                          if isinstance(v, torch.Tensor)} for i, s in opt.state_dict()["state"].items()}
        out[name] = {"params": [p.full_tensor().detach() for p in model.parameters()], "state": full_state,
                     "local_state": _local_state(opt),
                     "param_types": {type(p).__name__ for p in model.parameters()}}
    return out


def _dcp_checks(rank: int, mesh, root: Path) -> dict:
    """Save sharded with torch.distributed.checkpoint, continue; load into a fresh model and optimizer, continue."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    out = {}
    for name in NAMES:
        path = root / f"dcp-{name}"
        model = _fsdp_model(mesh)
        opt = make_opt(name, model.parameters(), chunk_size=CHUNK)
        train(model, opt, 5, rank)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
        train(model, opt, 5, rank, first=5)
        continued = ([p.to_local().clone() for p in model.parameters()], _local_state(opt))

        model = _fsdp_model(mesh, seed=1)  # another initialisation: everything must come from the checkpoint
        opt = make_opt(name, model.parameters(), chunk_size=CHUNK)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        train(model, opt, 5, rank, first=5)
        resumed = ([p.to_local().clone() for p in model.parameters()], _local_state(opt))
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        chunks = {key: (tuple(m.size), len(m.chunks)) for key, m in metadata.items()
                  if key.startswith("optim.state.") and hasattr(m, "chunks")}
        out[name] = {"continued": continued, "resumed": resumed, "chunks": chunks,
                     "files": sorted(f.name for f in path.iterdir())}
    return out


def _mixed_precision_checks(rank: int, mesh) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    out = {}
    for name in NAMES:
        model = _fsdp_model(mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.float32))
        opt = make_opt(name, model.parameters(), chunk_size=CHUNK)
        train(model, opt, FSDP_STEPS, rank)
        bf16 = _fsdp_model(mesh, dtype=torch.bfloat16)  # bf16 parameters themselves, fp32 state by default
        bf16_opt = make_opt(name, bf16.parameters(), chunk_size=CHUNK)
        train(lambda x, m=bf16: m(x.to(torch.bfloat16)).float(), bf16_opt, 5, rank)
        out[name] = {"params": [p.full_tensor().detach() for p in model.parameters()],
                     "param_dtypes": {p.to_local().dtype for p in model.parameters()},
                     "state_dtypes": {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"},
                     "bf16_param_dtypes": {p.to_local().dtype for p in bf16.parameters()},
                     "bf16_state_dtypes": {v.dtype for s in bf16_opt.state.values() for k, v in s.items()
                                           if k != "step"},
                     "bf16_finite": all(bool(torch.isfinite(p.full_tensor().float()).all())
                                        for p in bf16.parameters())}
    return out


def _nonfinite_check(rank: int, mesh) -> dict:
    """A NaN in one rank's shard of a gradient: every rank skips that tensor, the others still step."""
    model = _fsdp_model(mesh)
    opt = make_opt("scale", model.parameters(), chunk_size=CHUNK)
    train(model, opt, 2, rank)
    before = [p.full_tensor().detach() for p in model.parameters()]
    x, y = batch(2, rank)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    if rank == 1:
        next(model.parameters()).grad.to_local()[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    after = [p.full_tensor().detach() for p in model.parameters()]
    return {"changed": [not torch.equal(a, b) for a, b in zip(before, after)],
            "warned": any("non-finite" in str(w.message) for w in caught)}


def _worker(root: Path) -> None:
    import importlib.util

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*weights=.*untrained")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {"ddp": _ddp_checks(rank), "fsdp": _fsdp_checks(rank, mesh), "dcp": _dcp_checks(rank, mesh, root),
               "mixed": _mixed_precision_checks(rank, mesh), "nonfinite": _nonfinite_check(rank, mesh)}
    if rank == 0:
        results["reference"] = {name: reference_run(name) for name in NAMES}
        results["reference_chunked"] = {name: reference_run(name, FSDP_STEPS, chunk_size=CHUNK) for name in NAMES}
    # the example, inside this process group (its own torchrun launch is the same code path)
    spec = importlib.util.spec_from_file_location("train_ddp", REPO / "examples" / "train_ddp.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "4", "--log-every", "2"])
    example.main(["--steps", "4", "--log-every", "2", "--fsdp", "--bf16", "--weights", "scale"])
    torch.save(results, root / f"rank{rank}.pt")
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    def build(root: Path) -> None:  # one torchrun per test run, whichever xdist worker gets here first
        env = dict(os.environ, OMP_NUM_THREADS="1", LEARNED_OPTIM_DATA="",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               str(Path(__file__).resolve()), str(root)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
        (root / "stdout.txt").write_text(proc.stdout)

    root = once_per_run(tmp_path_factory, "distributed", build)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks, (root / "stdout.txt").read_text()


def _assert_states(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), i
        for k in a[i]:
            x, y = a[i][k], b[i][k].reshape(a[i][k].shape)
            if tol:
                torch.testing.assert_close(y, x, **tol, msg=lambda m: f"state {i}/{k}: {m}")
            else:
                assert torch.equal(x, y), (i, k)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_ranks_step_identically_and_as_one_process(run, name):
    (r0, r1), _ = run
    a, b, ref = r0["ddp"][name], r1["ddp"][name], r0["reference"][name]
    for x, y, z in zip(a["params"], b["params"], ref["params"]):
        assert torch.equal(x, y) and torch.equal(x, z)
    _assert_states(a["state"], b["state"])
    _assert_states(a["state"], ref["state"])
    assert all(s["step"] == STEPS for s in a["state"].values())


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_sharded_run_equals_the_unsharded_one(run, name):
    (r0, r1), _ = run
    got, ref = r0["fsdp"][name], r0["reference_chunked"][name]
    assert got["param_types"] == {"DTensor"}
    for x, y in zip(got["params"], ref["params"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    for x, y in zip(got["params"], r1["fsdp"][name]["params"]):
        assert torch.equal(x, y)  # the same full tensors on both ranks
    # the recurrent state gathered from the shards is the unsharded optimizer's, coordinate by coordinate
    # (LSTM states of order 1: trained L2O-DM grows the chunking's ulp differences to ~3e-5 in 10 steps)
    _assert_states(ref["state"], got["state"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_each_rank_holds_its_shards_state(run, name):
    ranks, _ = run
    ref = ranks[0]["reference_chunked"][name]["state"]
    total = sum(v.nbytes for s in ref.values() for v in s.values())
    coords = {k for s in ref.values() for k, v in s.items() if v.dim() == 2 and v.shape[1] > 1}
    for r in ranks:
        local = r["fsdp"][name]["local_state"]
        assert 0.4 < sum(v.nbytes for s in local.values() for v in s.values()) / total < 0.6
    for i, s in ref.items():  # the shards' coordinates add up to the tensor's, each once
        for k in coords & s.keys():
            assert sum(r["fsdp"][name]["local_state"][i][k].shape[-1] for r in ranks) == s[k].shape[-1]


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_distributed_checkpoint_resumes_bit_for_bit(run, name):
    for r in run[0]:
        got = r["dcp"][name]
        (p1, s1), (p2, s2) = got["continued"], got["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))
        _assert_states(s1, s2)
    chunks = run[0][0]["dcp"][name]["chunks"]
    sharded = {k: v for k, v in chunks.items() if k.startswith("optim.state.0.weight.")
               and len(v[0]) == 3}  # (features, 31, 9): the per-coordinate state of the first weight
    assert sharded and all(n == WORLD for _, n in sharded.values())  # saved as one piece per rank
    assert sum(f.endswith(".distcp") for f in run[0][0]["dcp"][name]["files"]) == WORLD


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_mixed_precision(run, name):
    (r0, r1), _ = run
    got, fp32 = r0["mixed"][name], r0["fsdp"][name]
    assert got["param_dtypes"] == {torch.float32} and got["state_dtypes"] == {torch.float32}
    start = [p.detach() for p in make_model().requires_grad_(False).parameters()]
    moved = sum(float((b - s).norm()) for b, s in zip(fp32["params"], start))  # fp32 training, FSDP_STEPS steps
    differs = sum(float((a - b).norm()) for a, b in zip(got["params"], fp32["params"]))
    assert moved > 0 and differs < 0.2 * moved  # bf16 compute, the same training
    assert got["bf16_param_dtypes"] == {torch.bfloat16} and got["bf16_state_dtypes"] == {torch.float32}
    assert got["bf16_finite"]


def test_fsdp2_nonfinite_shard_is_skipped_on_every_rank(run):
    ranks, _ = run
    for r in ranks:
        assert r["nonfinite"]["changed"] == [False, True, True, True, True, True]
    assert ranks[1]["nonfinite"]["warned"] and ranks[0]["nonfinite"]["warned"]


def test_example_runs_under_ddp_and_fsdp2(run):
    _, stdout = run
    assert "DDP on 2 process(es), cpu: RNNprop" in stdout and "FSDP2 on 2 process(es), cpu: L2OScale" in stdout
    assert stdout.count("step     4  loss") == 2 and stdout.count("done: 4 steps") == 2


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
