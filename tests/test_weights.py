"""Weight files: safetensors round trip, metadata, refusal of bad files, names, model cards, spec parsing."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import learned_optim
from learned_optim import weights as W
from learned_optim.weights import WeightsError

RULE_NAMES = ("dm", "rnnprop", "scale")
CLASS_FOR_RULE = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}
RECIPE = {"task": "mnist-mlp", "unroll": 20, "meta_iterations": 3}
EVALUATION = {"final_loss": 0.25, "seeds": [0, 1]}


def make_rule(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return learned_optim.build_rule(name)


def write(tmp_path, name: str, seed: int = 0, **kwargs):
    path = tmp_path / f"{name}.safetensors"
    learned_optim.save_weights(make_rule(name, seed), path, **kwargs)
    return path


def raw_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def one_step(opt_cls, **kwargs) -> None:
    """Build ``opt_cls`` on a tiny model, take one step, check it moved the parameters (finitely)."""
    model = small_model()
    opt = opt_cls(model.parameters(), **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", RULE_NAMES)
def test_round_trip_tensors_and_metadata(tmp_path, name):
    rule = make_rule(name, seed=3)
    path = learned_optim.save_weights(rule, tmp_path / "w.safetensors", recipe=RECIPE, evaluation=EVALUATION)
    assert path == tmp_path / "w.safetensors" and path.is_file()
    assert not list(tmp_path.glob("*.tmp")), "the atomic write left its temporary file behind"

    loaded = learned_optim.load_rule(path)
    assert type(loaded) is type(rule) and loaded.name == name
    assert loaded.config() == rule.config()
    ref, got = rule.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key].float(), got[key]), key

    raw = raw_metadata(path)  # what is on disk: strings only, JSON for the nested fields
    for key in ("format", "format_version", "rule", "config", "recipe", "evaluation", "learned_optim_version"):
        assert key in raw and isinstance(raw[key], str), key
    assert raw["format"] == "learned_optim" and raw["format_version"] == "1" and raw["rule"] == name
    assert json.loads(raw["config"]) == rule.config()
    assert raw["learned_optim_version"] == learned_optim.__version__

    meta = learned_optim.read_metadata(path)  # decoded view
    assert meta["rule"] == name and meta["config"] == rule.config()
    assert meta["recipe"] == RECIPE and meta["evaluation"] == EVALUATION


def test_weights_digest_names_the_tensors_not_the_provenance(tmp_path):
    torch.manual_seed(0)
    rule = learned_optim.build_rule("dm")
    a = learned_optim.save_weights(rule, tmp_path / "a.safetensors", recipe={"epochs": 1})
    b = learned_optim.save_weights(rule, tmp_path / "b.safetensors", recipe={"epochs": 1, "notes": "re-exported"},
                                   evaluation={"mlp-orig": {"final_ln_loss_mean": -5.0}})
    assert W.sha256_file(a) != W.sha256_file(b)  # the card changed the file ...
    assert learned_optim.weights_digest(a) == learned_optim.weights_digest(b)  # ... not what it computes
    with torch.no_grad():
        next(rule.parameters()).view(-1)[0] += 1e-6
    c = learned_optim.save_weights(rule, tmp_path / "c.safetensors", recipe={"epochs": 1})
    assert learned_optim.weights_digest(c) != learned_optim.weights_digest(a)
    d = learned_optim.save_weights(learned_optim.build_rule("dm", {**rule.config(), "hidden_size": 8}),
                                   tmp_path / "d.safetensors")
    assert learned_optim.weights_digest(d) != learned_optim.weights_digest(a)
    assert f"`{learned_optim.weights_digest(a)}`" in learned_optim.model_card(a)


def test_config_key_added_later_means_its_legacy_value_in_old_files(tmp_path):
    torch.manual_seed(0)
    shared = learned_optim.build_rule("scale", {"lr_offset": "shared"})
    spelled = learned_optim.save_weights(shared, tmp_path / "spelled.safetensors")
    old = tmp_path / "old.safetensors"  # as written before the key existed
    old.write_bytes(spelled.read_bytes())
    config = json.loads(raw_metadata(old)["config"])
    del config["lr_offset"]
    _rewrite(old, metadata={**raw_metadata(old), "config": json.dumps(config, sort_keys=True)})
    assert "lr_offset" not in learned_optim.read_metadata(old)["config"]
    assert learned_optim.load_rule(old).lr_offset == "shared"
    assert learned_optim.load_rule(old, config={"lr_offset": "shared"}).lr_offset == "shared"
    with pytest.raises(WeightsError, match="does not match"):
        learned_optim.load_rule(old, config={"lr_offset": "tensor"})
    # the same computation, so the same digest: evaluations keyed on the old file stay valid
    assert learned_optim.weights_digest(old) == learned_optim.weights_digest(spelled)
    per_tensor = learned_optim.build_rule("scale", {"lr_offset": "tensor"})
    per_tensor.load_state_dict(shared.state_dict())
    other = learned_optim.save_weights(per_tensor, tmp_path / "tensor.safetensors")
    assert learned_optim.weights_digest(other) != learned_optim.weights_digest(old)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_round_trip_defaults_and_load_with_expected_rule_and_config(tmp_path, name):
    path = write(tmp_path, name)
    meta = learned_optim.read_metadata(path)
    assert meta["recipe"] == {} and meta["evaluation"] == {}
    rule = learned_optim.load_rule(path, rule=name, config=make_rule(name).config())
    assert rule.name == name
    # a partial config that matches the file once defaults are filled in is accepted too
    first_key = next(iter(meta["config"]))
    assert learned_optim.load_rule(path, config={first_key: meta["config"][first_key]}).name == name


def test_save_converts_to_float32_cpu_contiguous(tmp_path):
    rule = make_rule("dm").to(torch.float64)
    path = learned_optim.save_weights(rule, tmp_path / "w.safetensors")
    assert all(t.dtype == torch.float32 for t in load_file(str(path)).values())
    loaded = learned_optim.load_rule(path)
    for key, value in rule.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.float())


# --------------------------------------------------------------------------- refusing the wrong rule / config
def test_wrong_rule_names_both_rules(tmp_path):
    path = write(tmp_path, "dm")
    with pytest.raises(WeightsError) as info:
        learned_optim.load_rule(path, rule="rnnprop")
    message = str(info.value)
    assert "'dm'" in message and "'rnnprop'" in message
    assert "L2ODM" in message  # tells the user which optimizer class fits the file


def test_mismatched_config_is_refused(tmp_path):
    path = write(tmp_path, "dm")
    with pytest.raises(WeightsError, match="config") as info:
        learned_optim.load_rule(path, config={"hidden_size": 7})
    assert "7" in str(info.value) and "20" in str(info.value)  # both configs are shown


def test_config_with_unknown_key_is_refused_as_weights_error(tmp_path):
    path = write(tmp_path, "dm")
    with pytest.raises(WeightsError, match="does not fit"):
        learned_optim.load_rule(path, config={"no_such_option": 1})


# --------------------------------------------------------------------------- damaged / foreign files
def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        learned_optim.load_rule(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="safetensors"):
        learned_optim.load_rule(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(WeightsError):
        learned_optim.load_rule(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", RULE_NAMES)
def test_truncated_file_is_refused(tmp_path, name):
    path = write(tmp_path, name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        learned_optim.load_rule(path)


def test_truncated_file_read_metadata_is_refused(tmp_path):
    path = write(tmp_path, "dm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(WeightsError, match="re-download"):
        learned_optim.read_metadata(path)


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(dict(make_rule("dm").state_dict()), str(path))
    with pytest.raises(WeightsError, match="not a learned_optim weight file") as info:
        learned_optim.load_rule(path)
    assert "save_weights" in str(info.value)  # says how to make a proper file


def _rewrite(path, *, tensors=None, metadata=None):
    """Write ``path`` again with edited tensors and/or metadata."""
    new_tensors = load_file(str(path)) if tensors is None else tensors
    new_meta = raw_metadata(path) if metadata is None else metadata
    save_file(new_tensors, str(path), metadata=new_meta)


@pytest.mark.parametrize("edit, expected", [
    ({"format_version": "99"}, "upgrade learned-optim"),
    ({"config": "{not json"}, "not valid JSON"),
    ({"rule": "adamw"}, "unknown rule 'adamw'"),
    ({"format": "pt"}, "not a learned_optim weight file"),
])
def test_bad_metadata_is_refused(tmp_path, edit, expected):
    path = write(tmp_path, "dm")
    _rewrite(path, metadata={**raw_metadata(path), **edit})
    with pytest.raises(WeightsError, match=re.escape(expected)):
        learned_optim.load_rule(path)


def test_missing_metadata_key_is_refused(tmp_path):
    path = write(tmp_path, "dm")
    meta = raw_metadata(path)
    del meta["recipe"]
    _rewrite(path, metadata=meta)
    with pytest.raises(WeightsError, match="lacks metadata.*recipe"):
        learned_optim.read_metadata(path)


def test_config_that_does_not_build_the_rule_is_refused(tmp_path):
    path = write(tmp_path, "dm")
    _rewrite(path, metadata={**raw_metadata(path), "config": json.dumps({"bogus": 1})})
    with pytest.raises(WeightsError, match="does not fit rule 'dm'"):
        learned_optim.load_rule(path)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_missing_tensor_is_refused(tmp_path, name):
    path = write(tmp_path, name)
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    _rewrite(path, tensors=tensors)
    with pytest.raises(WeightsError, match="tensors do not match") as info:
        learned_optim.load_rule(path)
    assert dropped in str(info.value) and "Missing" in str(info.value)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_extra_tensor_is_refused(tmp_path, name):
    path = write(tmp_path, name)
    tensors = load_file(str(path))
    tensors["surprise.weight"] = torch.zeros(3)
    _rewrite(path, tensors=tensors)
    with pytest.raises(WeightsError, match="tensors do not match") as info:
        learned_optim.load_rule(path)
    assert "surprise.weight" in str(info.value)


def test_wrong_tensor_shape_is_refused(tmp_path):
    path = write(tmp_path, "dm")
    tensors = load_file(str(path))
    tensors["output.bias"] = torch.zeros(2)
    _rewrite(path, tensors=tensors)
    with pytest.raises(WeightsError, match="output.bias"):
        learned_optim.load_rule(path)


def test_file_claiming_other_config_than_its_tensors_is_refused(tmp_path):
    path = write(tmp_path, "dm")
    meta = raw_metadata(path)
    config = json.loads(meta["config"])
    config["hidden_size"] = 7
    _rewrite(path, metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(WeightsError, match="tensors do not match"):
        learned_optim.load_rule(path)


# --------------------------------------------------------------------------- bundled names (fake registry)
@pytest.fixture
def fake_pretrained(tmp_path, monkeypatch):
    """A pretrained folder with two registered weight files (correct sha256) in place of the checkout's."""
    folder = tmp_path / "pretrained"
    folder.mkdir()
    registry = {}
    for name, rule in (("fake-dm", "dm"), ("fake-rnnprop", "rnnprop")):
        path = learned_optim.save_weights(make_rule(rule, seed=5), folder / f"{name}.safetensors",
                                          recipe={"fake": True})
        (folder / f"{name}.md").write_text(learned_optim.model_card(path, name=name))
        registry[name] = {"file": path.name, "sha256": W.sha256_file(path), "rule": rule}
    (folder / "registry.json").write_text(json.dumps(registry, indent=2))
    monkeypatch.setattr(W, "pretrained_dir", lambda: folder)
    return folder


def test_registry_and_available_weights_filter_by_rule(fake_pretrained):
    assert set(W.registry()) == {"fake-dm", "fake-rnnprop"}
    assert learned_optim.available_weights() == ["fake-dm", "fake-rnnprop"]
    assert learned_optim.available_weights("dm") == ["fake-dm"]
    assert learned_optim.available_weights(rule="rnnprop") == ["fake-rnnprop"]
    assert learned_optim.available_weights("scale") == []


def test_registered_name_resolves_to_bundled_file(fake_pretrained):
    assert learned_optim.resolve_weights("fake-dm") == fake_pretrained / "fake-dm.safetensors"
    rule = learned_optim.load_rule(learned_optim.resolve_weights("fake-rnnprop"), rule="rnnprop")
    assert rule.name == "rnnprop"


def test_registered_name_through_optimizer_class(fake_pretrained):
    one_step(learned_optim.L2ODM, weights="fake-dm")
    one_step(learned_optim.RNNprop, weights="fake-rnnprop")
    with pytest.raises(WeightsError, match="'dm'.*'rnnprop'"):
        learned_optim.RNNprop(small_model().parameters(), weights="fake-dm")


def test_unknown_name_lists_known_names(fake_pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "dm-nope" cannot accidentally be a file
    with pytest.raises(WeightsError, match="Unknown weights 'dm-nope'") as info:
        learned_optim.resolve_weights("dm-nope")
    message = str(info.value)
    assert "fake-dm" in message and "fake-rnnprop" in message and "hf://" in message
    with pytest.raises(WeightsError, match="fake-dm"):
        learned_optim.L2ODM(small_model().parameters(), weights="dm-nope")


def test_unknown_name_with_empty_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "pretrained_dir", lambda: tmp_path / "nothing-here")
    assert learned_optim.available_weights() == []
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match="none bundled"):
        learned_optim.resolve_weights("dm-cl-il")


def test_sha256_mismatch_is_refused(fake_pretrained):
    path = fake_pretrained / "fake-dm.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte: still a valid safetensors file
    path.write_bytes(bytes(data))
    learned_optim.load_rule(path)  # loads as a file ...
    with pytest.raises(WeightsError, match="sha256"):  # ... but not as the registered name
        learned_optim.resolve_weights("fake-dm")
    with pytest.raises(WeightsError, match="sha256"):
        learned_optim.L2ODM(small_model().parameters(), weights="fake-dm")


def test_registered_but_missing_file_is_refused(fake_pretrained):
    (fake_pretrained / "fake-dm.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing"):
        learned_optim.resolve_weights("fake-dm")


def test_path_spec_resolves_to_itself(tmp_path):
    path = write(tmp_path, "scale")
    assert learned_optim.resolve_weights(path) == path
    assert learned_optim.resolve_weights(str(path)) == path


# --------------------------------------------------------------------------- the checkout's own bundled weights
def _checkout_registry():
    return sorted(W.registry().items())


@pytest.mark.parametrize("name, entry", _checkout_registry())
def test_bundled_weights_verify_and_load(name, entry):
    path = learned_optim.resolve_weights(name)  # sha256 checked here
    rule = learned_optim.load_rule(path, rule=entry["rule"])
    assert learned_optim.read_metadata(path)["rule"] == entry["rule"] == rule.name
    assert name in learned_optim.available_weights(entry["rule"])
    assert (W.pretrained_dir() / f"{name}.md").is_file(), "bundled weights need their model card"
    one_step(CLASS_FOR_RULE[entry["rule"]], weights=name)


# --------------------------------------------------------------------------- model card
def _front_matter(card: str) -> dict[str, object]:
    """Tiny YAML-front-matter reader (scalars and ``- item`` lists), enough for the card's header."""
    lines = card.splitlines()
    assert lines[0] == "---", "a model card starts with YAML front matter"
    end = lines.index("---", 1)
    out: dict[str, object] = {}
    key = None
    for line in lines[1:end]:
        if line.startswith("- ") and key is not None:
            out.setdefault(key, [])
            out[key].append(line[2:].strip())  # type: ignore[union-attr]
        else:
            key, _, value = line.partition(":")
            key = key.strip()
            if value.strip():
                out[key] = value.strip()
    return out


@pytest.mark.parametrize("name", RULE_NAMES)
def test_model_card_front_matter_and_content(tmp_path, name):
    path = write(tmp_path, name, recipe=RECIPE, evaluation=EVALUATION)
    card = learned_optim.model_card(path, name=f"my-{name}")
    header = _front_matter(card)
    assert header["license"] == "mit"
    assert header["library_name"] == "learned-optim"
    assert "learned-optimizer" in header["tags"] and name in header["tags"]  # type: ignore[operator]
    cls = CLASS_FOR_RULE[name].__name__
    assert f"learned_optim.{cls}(model.parameters(), weights='my-{name}')" in card
    assert W.sha256_file(path) in card
    assert '"meta_iterations": 3' in card and '"final_loss": 0.25' in card


def test_model_card_defaults(tmp_path):
    path = write(tmp_path, "dm")
    card = learned_optim.model_card(path, license="apache-2.0")
    assert _front_matter(card)["license"] == "apache-2.0"
    assert "# dm" in card and "Not evaluated yet." in card


def test_model_card_refuses_foreign_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError):
        learned_optim.model_card(path)


# --------------------------------------------------------------------------- optimizer classes + files
def test_optimizer_classes_accept_matching_files_only(tmp_path):
    paths = {name: write(tmp_path, name) for name in RULE_NAMES}
    for name, cls in CLASS_FOR_RULE.items():
        one_step(cls, weights=str(paths[name]))
        opt = cls(small_model().parameters(), weights=paths[name])
        assert opt.weights == str(paths[name]) and opt.rule.name == name
        assert torch.equal(next(iter(opt.rule.state_dict().values())),
                           next(iter(make_rule(name).state_dict().values())))
    with pytest.raises(WeightsError) as info:
        learned_optim.RNNprop(small_model().parameters(), weights=paths["dm"])
    assert "'dm'" in str(info.value) and "'rnnprop'" in str(info.value)
    with pytest.raises(WeightsError):
        learned_optim.L2OScale(small_model().parameters(), weights=paths["rnnprop"])
    # the generic class takes any rule's file
    assert learned_optim.LearnedOptimizer(small_model().parameters(), weights=paths["scale"]).rule.name == "scale"


def test_optimizer_refuses_damaged_file(tmp_path):
    path = write(tmp_path, "dm")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError):
        learned_optim.L2ODM(small_model().parameters(), weights=path)


# --------------------------------------------------------------------------- hf:// spec parsing
@pytest.mark.parametrize("spec, expected", [
    ("hf://org/repo", ("org/repo", "weights.safetensors", None)),
    ("hf://org/repo/", ("org/repo", "weights.safetensors", None)),
    ("hf://org/repo@v1", ("org/repo", "weights.safetensors", "v1")),
    ("hf://org/repo/file.safetensors", ("org/repo", "file.safetensors", None)),
    ("hf://org/repo/sub/file.safetensors@v1", ("org/repo", "sub/file.safetensors", "v1")),
    ("hf://org/repo/sub/dir/file.safetensors@" + "a" * 40, ("org/repo", "sub/dir/file.safetensors", "a" * 40)),
    ("hf://org/repo@refs/pr/1", ("org/repo", "weights.safetensors", "refs/pr/1")),
])
def test_parse_hf_spec(spec, expected):
    assert W.parse_hf_spec(spec) == expected


@pytest.mark.parametrize("spec", [
    "hf://", "hf://org", "hf://org/", "hf://@v1", "hf://org@v1", "hf://org/repo@", "hf://org/repo/file@",
    "org/repo", "https://huggingface.co/org/repo",
])
def test_parse_hf_spec_rejects_bad_specs(spec):
    with pytest.raises(WeightsError, match="hf://"):
        W.parse_hf_spec(spec)


def test_resolve_weights_rejects_bad_hf_spec_before_any_network():
    with pytest.raises(WeightsError, match="Invalid hub reference"):
        learned_optim.resolve_weights("hf://just-an-org")
    with pytest.raises(WeightsError, match="Empty revision"):
        learned_optim.L2ODM(small_model().parameters(), weights="hf://org/repo@")
