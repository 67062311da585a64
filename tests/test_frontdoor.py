"""What a new user runs into first: API misuse caught with a clear message, command lines that never lose a
run or an export, and one-line errors (exit status 2) for every user mistake. Synthetic data, in-process."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import learned_optim
from helpers import write_synthetic_mnist
from learned_optim import optimizer as optimizer_module
from learned_optim.weights import user_weights_dir


@pytest.fixture(autouse=True)
def own_weights_folder(tmp_path, monkeypatch):
    """Each test exports into its own empty user weights folder."""
    monkeypatch.setenv("LEARNED_OPTIM_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), "MNIST")


def param():
    return torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------ the optimizer API
def test_weights_given_positionally_work_like_the_keyword():
    a = learned_optim.RNNprop([param()], "rnnprop-cl-il")
    b = learned_optim.RNNprop([param()], weights="rnnprop-cl-il")
    assert a.weights == b.weights == "rnnprop-cl-il"
    assert all(torch.equal(x, y) for x, y in zip(a.rule.state_dict().values(), b.rule.state_dict().values()))
    with pytest.raises(TypeError, match="weights twice"):
        learned_optim.RNNprop([param()], "rnnprop", weights="rnnprop-cl-il")


@pytest.mark.parametrize("kwargs, error, words", [
    ({"lr": "x"}, TypeError, "learning rate"), ({"lr": True}, TypeError, "learning rate"),
    ({"lr": -1.0}, ValueError, "learning rate"), ({"lr": float("nan")}, ValueError, "learning rate"),
    ({"maximize": 1}, TypeError, "maximize"), ({"chunk_size": 2.5}, ValueError, "chunk_size"),
    ({"chunk_size": True}, ValueError, "chunk_size"), ({"state_dtype": "bf16"}, ValueError, "state_dtype"),
    ({"nonfinite": "ignore"}, ValueError, "nonfinite"), ({"weights": 3}, TypeError, "weights="),
])
def test_bad_arguments_get_a_clear_error(kwargs, error, words):
    kwargs = {"weights": "dm", **kwargs}
    with pytest.raises(error, match=words):
        learned_optim.L2ODM([param()], **kwargs)


def test_a_number_where_the_rule_goes_says_to_use_keywords():
    with pytest.raises(TypeError, match=r"weights='rnnprop-cl-il', lr=0.5"):
        learned_optim.RNNprop([param()], 0.5)


def test_no_weights_warns_once_that_the_rule_is_untrained(monkeypatch):
    monkeypatch.setattr(optimizer_module, "_WARNED_UNTRAINED", set())
    with pytest.warns(UserWarning, match="untrained") as record:
        learned_optim.L2ODM([param()])
    assert "dm-cl-il" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned_optim.L2ODM([param()])  # once per class
        learned_optim.L2ODM([param()], rule=learned_optim.build_rule("dm"))  # an explicit rule is a choice
        learned_optim.L2ODM([param()], weights="dm")


def _stepped(cls, weights, steps=2):
    p = param()
    opt = cls([p], weights=weights)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()
    return opt


@pytest.mark.parametrize("drop_identity", [False, True])
def test_state_of_another_rule_is_refused_and_nothing_changes(drop_identity):
    source = _stepped(learned_optim.RNNprop, "rnnprop").state_dict()
    if drop_identity:  # a state dict saved before the rule identity was recorded: its shapes give it away
        source = {k: v for k, v in source.items() if k != "learned_optim"}
    target = _stepped(learned_optim.L2ODM, "dm")
    before = {k: v.clone() for k, v in target.state[target.param_groups[0]["params"][0]].items()}
    with pytest.raises(ValueError, match="rnnprop" if not drop_identity else "not the recurrent state of a 'dm'"):
        target.load_state_dict(source)
    after = target.state[target.param_groups[0]["params"][0]]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_state_of_another_rule_config_is_refused():
    source = _stepped(learned_optim.L2OScale, "scale")  # bundled Scale files draw one shared lr offset
    target = learned_optim.L2OScale([param()], rule=learned_optim.build_rule("scale"))  # a fresh rule: per tensor
    with pytest.raises(ValueError, match="lr_offset"):
        target.load_state_dict(source.state_dict())
    same = _stepped(learned_optim.L2OScale, "scale-cl-il")  # same rule and config, other weights: fine
    same.load_state_dict(source.state_dict())


def test_model_card_takes_names_paths_and_says_the_recipe(tmp_path):
    card = learned_optim.model_card("rnnprop-cl-il")
    assert "# rnnprop-cl-il" in card and "weights='rnnprop-cl-il'" in card and "random scaling" in card
    path = learned_optim.resolve_weights("dm")
    assert learned_optim.model_card(path).startswith("---\nlicense: mit")
    with pytest.raises(learned_optim.WeightsError, match="Unknown weights"):
        learned_optim.model_card("no-such-weights")


def test_help_shows_each_optimizers_arguments():
    for cls in (learned_optim.L2ODM, learned_optim.RNNprop, learned_optim.L2OScale):
        doc = cls.__doc__
        assert "Example::" in doc and "weights=" in doc
        for arg in ("params", "weights", "lr", "maximize", "state_dtype", "nonfinite"):
            assert f"        {arg}" in doc, (cls.__name__, arg)


# ------------------------------------------------------------------------------ meta_train never loses a run
def _meta_train(args, data_root, capsys):
    from meta_train.__main__ import main

    with pytest.raises(SystemExit) as info:
        main([*args, "--data-root", str(data_root), "--no-progress", "--threads", "1"])
        raise SystemExit(0)
    return info.value.code, capsys.readouterr().err


TINY_RUN = ["--model", "dm", "--horizons", "10", "--unroll", "5", "--epochs", "1", "--eval-every", "1",
            "--eval-runs", "1"]


def test_existing_out_is_refused_and_resume_with_nothing_left_says_so(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    code, _ = _meta_train([*TINY_RUN, "--out", str(out)], data_root, capsys)
    assert code == 0
    weights = (out / "weights.safetensors").read_bytes()
    log = (out / "log.jsonl").read_text()
    # the same command again: refused, one line, nothing touched
    code, err = _meta_train([*TINY_RUN, "--out", str(out)], data_root, capsys)
    assert code == 2 and err.count("\n") == 1 and "--resume" in err and "--overwrite" in err
    assert (out / "weights.safetensors").read_bytes() == weights and (out / "log.jsonl").read_text() == log
    # --resume of a finished run: says there is nothing left, leaves the files as they are
    code, err = _meta_train([*TINY_RUN, "--out", str(out), "--resume"], data_root, capsys)
    assert code == 0 and "nothing left to do" in err and "--epochs" in err
    assert (out / "weights.safetensors").read_bytes() == weights and (out / "log.jsonl").read_text() == log
    # a changed recipe: one line, exit 2, no traceback
    code, err = _meta_train([*TINY_RUN, "--out", str(out), "--resume", "--epochs", "2", "--imitation"], data_root,
                            capsys)
    assert code == 2 and err.count("\n") == 1 and "different recipe" in err and "imitation" in err
    assert "Traceback" not in err
    # --overwrite starts over
    code, _ = _meta_train([*TINY_RUN, "--out", str(out), "--overwrite", "--seed", "1"], data_root, capsys)
    assert code == 0 and (out / "weights.safetensors").read_bytes() != weights


def test_files_without_a_checkpoint_are_not_overwritten_by_resume(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("precious\n")
    code, err = _meta_train([*TINY_RUN, "--out", str(out), "--resume"], data_root, capsys)
    assert code == 2 and "no checkpoint.pt" in err and (out / "log.jsonl").read_text() == "precious\n"


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], "--epochs must be >= 1"), (["--random-scale", "-1"], "--random-scale"),
    (["--horizons", "10,x"], "--horizons"), (["--imitation-ratio", "2"], "imitation ratios"),
    (["--meta-lr", "0"], "--meta-lr"), (["--model", "lstm"], "--model"),
])
def test_bad_flag_values_are_one_line(tmp_path, data_root, capsys, args, words):
    base = TINY_RUN[2:] if "--model" in args else TINY_RUN
    code, err = _meta_train([*base, *args, "--out", str(tmp_path / "x")], data_root, capsys)
    assert code == 2 and err.count("\n") == 1 and words in err and "--help" in err


def test_missing_data_is_one_line(tmp_path, capsys):
    code, err = _meta_train([*TINY_RUN, "--out", str(tmp_path / "x")], tmp_path / "empty", capsys)
    assert code == 2 and err.count("\n") == 1 and "LEARNED_OPTIM_DATA" in err


# ------------------------------------------------------------------------------ exports never overwrite
def _run_dir(tmp_path, seed=0):
    run = tmp_path / f"run{seed}"
    run.mkdir()
    torch.manual_seed(seed)
    learned_optim.save_weights(learned_optim.build_rule("dm"), run / "weights.safetensors", recipe={"seed": seed})
    return run


def test_export_goes_to_the_user_folder_and_resolves_by_name(tmp_path, capsys):
    from meta_train.export import main as export_main

    assert export_main([str(_run_dir(tmp_path)), "my-dm"]) == 0
    path = user_weights_dir() / "my-dm.safetensors"
    assert capsys.readouterr().out.strip() == str(path) and (user_weights_dir() / "my-dm.md").is_file()
    assert "my-dm" in learned_optim.available_weights("dm")
    opt = learned_optim.L2ODM([param()], weights="my-dm")
    assert torch.equal(opt.rule.output.weight, learned_optim.load_rule(path).output.weight)
    # the package's own folder is untouched
    assert "my-dm" not in learned_optim.weights.registry()
    # the same name again: refused without --force, the export unchanged
    before = path.read_bytes()
    assert export_main([str(_run_dir(tmp_path, seed=1)), "my-dm"]) == 2
    assert "exist already" in capsys.readouterr().err and path.read_bytes() == before
    assert export_main([str(tmp_path / "run1"), "my-dm", "--force"]) == 0
    assert path.read_bytes() != before


def test_export_over_a_bundled_name_needs_force_and_then_wins(tmp_path, capsys):
    from meta_train.export import main as export_main

    bundled = learned_optim.resolve_weights("dm-il")
    bundled_bytes = bundled.read_bytes()
    assert export_main([str(_run_dir(tmp_path, seed=2)), "dm-il"]) == 2
    err = capsys.readouterr().err
    assert "bundled" in err and "--force" in err and err.count("\n") == 1
    assert export_main([str(tmp_path / "run2"), "dm-il", "--force"]) == 0
    assert learned_optim.resolve_weights("dm-il") == user_weights_dir() / "dm-il.safetensors"
    assert bundled.read_bytes() == bundled_bytes  # the shipped file was never written
    registry = json.loads((user_weights_dir() / "registry.json").read_text())
    registry.pop("dm-il")
    (user_weights_dir() / "registry.json").write_text(json.dumps(registry))
    assert learned_optim.resolve_weights("dm-il") == bundled


def test_export_of_a_folder_without_weights_is_one_line(tmp_path, capsys):
    from meta_train.export import main as export_main

    assert export_main([str(tmp_path), "nothing"]) == 2
    assert "weights.safetensors does not exist" in capsys.readouterr().err
    assert export_main([str(_run_dir(tmp_path, seed=3)), "../escape"]) == 2
