"""The whole package on a CUDA GPU (marker ``cuda``, skipped without one): optimizer state dicts move between
CUDA and the CPU, meta-training on CUDA resumes (on CUDA and on the CPU), and the evaluation protocol on CUDA
reproduces the CPU's loss curves. Synthetic data only. ``scripts/gpu_check.sh`` runs these with the kernel tests.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import learned_optim
from helpers import imitation_trained_rule, synthetic_images, write_synthetic_mnist

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CLASSES = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}
TINY = ["--horizons", "20,40", "--eval-every", "2", "--eval-runs", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_synthetic_mnist(tmp_path_factory.mktemp("small"), "MNIST", n_train=256, n_test=128, size=8)


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3)).to(device)


def _steps(model, opt, n, seed):
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(n):
        x = torch.randn(16, 10, generator=gen).to(device)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def state_dict_cpu_and_back(name: str, device: str = "cuda") -> None:
    """An optimizer state_dict saved on ``device`` loads on the CPU (map_location) and back, exactly, and both
    continue like the uninterrupted run."""
    rule = copy.deepcopy(imitation_trained_rule(name, meta_steps=30))
    model = _model(device)
    opt = CLASSES[name](model.parameters(), copy.deepcopy(rule).to(device))
    _steps(model, opt, 3, seed=0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)

    cpu_model = copy.deepcopy(model).cpu()
    cpu_opt = CLASSES[name](cpu_model.parameters(), copy.deepcopy(rule))
    cpu_opt.load_state_dict(saved)
    for p_dev, p_cpu in zip(model.parameters(), cpu_model.parameters()):
        for key, value in opt.state[p_dev].items():
            loaded = cpu_opt.state[p_cpu][key]
            assert loaded.device.type == "cpu" and loaded.dtype == value.dtype, key
            assert torch.equal(loaded, value.cpu()), key

    back_model = copy.deepcopy(cpu_model).to(device)
    back_opt = CLASSES[name](back_model.parameters(), copy.deepcopy(rule).to(device))
    back_opt.load_state_dict(copy.deepcopy(cpu_opt.state_dict()))
    for p_dev, p_back in zip(model.parameters(), back_model.parameters()):
        for key, value in opt.state[p_dev].items():
            if key != "step":
                assert back_opt.state[p_back][key].device == p_back.device
            assert torch.equal(back_opt.state[p_back][key].cpu(), value.cpu()), key

    for m, o in ((model, opt), (cpu_model, cpu_opt), (back_model, back_opt)):
        _steps(m, o, 3, seed=1)
    for a, b, c in zip(model.parameters(), cpu_model.parameters(), back_model.parameters()):
        torch.testing.assert_close(c.detach(), a.detach(), rtol=1e-6, atol=1e-7)  # same device, same history
        torch.testing.assert_close(b.detach(), a.detach().cpu(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_state_dict_saved_on_cuda_loads_on_the_cpu_and_back(name):
    state_dict_cpu_and_back(name)



def test_lstm_cell_on_cuda_matches_nn_lstmcell():
    """On CUDA the rules' LSTM cell takes torch.tanh (the sigmoid form is the CPU's): same maths as nn.LSTMCell."""
    from learned_optim.rules import lstm_cell

    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(7, 5).cuda()
    x, h, c = (torch.randn(11, k, device="cuda") for k in (7, 5, 5))
    h_ref, c_ref = cell(x, (h, c))
    h_ours, c_ours = lstm_cell(x.t().contiguous(), h.t().contiguous(), c.t().contiguous(), cell)
    torch.testing.assert_close(h_ours.t(), h_ref)
    torch.testing.assert_close(c_ours.t(), c_ref)

def meta_train_then_resume(root, out, first: str, second: str) -> dict:
    """``python -m meta_train ... --device FIRST`` for 3 epochs, then ``--resume`` on SECOND up to 6."""
    from meta_train.__main__ import main

    base = ["--model", "rnnprop", "--imitation", "--imitation-ratio", "0.5", *TINY, "--data-root", str(root),
            "--out", str(out)]
    main([*base, "--epochs", "3", "--device", first])
    main([*base, "--epochs", "6", "--device", second, "--resume"])
    rule = learned_optim.load_rule(out / "weights.safetensors")
    assert all(torch.isfinite(p).all() for p in rule.parameters())
    return learned_optim.read_metadata(out / "weights.safetensors")


@pytest.mark.parametrize("second", ["cuda", "cpu"])
def test_meta_train_on_cuda_resumes(tmp_path, small_root, second):
    meta = meta_train_then_resume(small_root, tmp_path / "run", "cuda", second)
    assert meta["recipe"]["epochs_run"] == 6


def evaluate_on(device: str, name: str, out, steps: int = 300):
    from meta_train import evaluate as ev

    images, labels = synthetic_images(256, 1, 28, seed=3)
    data = (torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long())
    return ev.evaluate(name, "mlp-orig", steps=steps, seeds=2, out=out, data=data, device=device, workers=1,
                       progress=False, plot=False)


@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_evaluate_on_cuda_matches_the_cpu(tmp_path, name):
    cpu = evaluate_on("cpu", name, tmp_path / "cpu")
    gpu = evaluate_on("cuda", name, tmp_path / "cuda")
    for a, b in zip(cpu["losses"], gpu["losses"]):
        assert len(a) == len(b)
        rel = sorted(abs(x - y) / abs(x) for x, y in zip(a, b))
        assert rel[len(rel) // 2] < 1e-3, rel[len(rel) // 2]  # median over the curve
        assert rel[-1] < 5e-2, rel[-1]
    assert abs(cpu["final_ln_loss_mean"] - gpu["final_ln_loss_mean"]) < 0.02


@pytest.mark.parametrize("name", ["dm", "rnnprop", "scale"])
def test_an_unrolled_step_never_waits_for_the_gpu(name):
    """The per-step work of meta-training (batch, optimizee forward/backward, the rule with an int step, the
    parameter update), one optimizee and a population, queues on the GPU without a host synchronisation
    (torch.cuda.set_sync_debug_mode raises on any); only a truncation's end reads values back."""
    from meta_train.tasks import Task
    from meta_train.unroll import population_step, start, start_population

    images, labels = synthetic_images(256, 1, 8, 0)
    data = (torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long())
    task = Task("mlp-orig", train=True, data=data, device="cuda")
    torch.manual_seed(0)
    rule = learned_optim.build_rule(name).cuda()
    gen, gens = torch.Generator().manual_seed(0), [torch.Generator().manual_seed(i) for i in range(3)]
    one, pop = start(rule, task, gen), start_population(rule, task, gens)[0]

    def steps(first: int, count: int):
        theta, state = one.theta.detach().requires_grad_(True), one.state
        thetas, states = pop.theta.detach().requires_grad_(True), pop.state
        for t in range(first, first + count):
            _, grad = task.loss_and_grad(theta, task.sample_batch(gen), keep_graph=True)
            update, state = rule(grad, state, t)
            theta = theta + update
            _, grads = task.population_loss_and_grad(thetas, task.sample_batches(gens), keep_graph=True)
            updates, states = population_step(rule, grads, states, t)
            thetas = thetas + updates

    steps(1, 1)  # first use: pinned host buffers, L2O-Scale's layout sizes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(2, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["dm", "rnnprop", "scale"])
def test_the_torch_path_of_step_waits_for_the_gpu_once(name):
    """``backend="torch"`` (L2O-Scale's only path) on CUDA: step counts and sizes reach the GPU through pinned,
    non-blocking copies, so the one host synchronisation of a step is the NaN/Inf check's, once per param
    group, whatever the number of chunks (chunk_size 64 here: many chunks)."""
    import warnings

    model = _model("cuda")
    opt = CLASSES[name](model.parameters(), learned_optim.build_rule(name).cuda(), backend="torch", chunk_size=64)
    xs = torch.randn(3, 16, 10, generator=torch.Generator().manual_seed(1)).cuda()  # no copies inside the steps

    def step(x):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step(xs[0])  # state initialised
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(xs[1])
            step(xs[2])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 2, [f"{w.filename}:{w.lineno}: {w.message}" for w in syncs]
