"""Weight files: names -> files (bundled, local path, or the Hugging Face hub) and safetensors I/O.

A weight file is a ``.safetensors`` file holding the rule's ``state_dict`` and string metadata:

=====================  ===========================================================
``format``             ``"learned_optim"``
``format_version``     ``"1"``
``rule``               registry name of the rule (``dm``, ``rnnprop``, ``scale``)
``config``             JSON of the rule's constructor arguments
``recipe``             JSON of the training recipe actually run (``{}`` for untrained)
``evaluation``         JSON of the evaluation summary (``{}`` if none)
``learned_optim_version``  the package version that wrote the file
=====================  ===========================================================

``resolve_weights(spec)`` turns ``weights=`` into a local file:

1. a registered name (``available_weights()``) -> the bundled file, checked against the sha256
   pinned in ``pretrained/registry.json``;
2. an existing path -> that file;
3. ``hf://org/repo[/file][@revision]`` -> ``huggingface_hub.hf_hub_download`` (cache, revision,
   ``local_files_only``, offline mode). ``file`` defaults to ``weights.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .rules import RULES, Rule, build_rule, stored_config

FORMAT = "learned_optim"
FORMAT_VERSION = "1"
DEFAULT_HUB_FILENAME = "weights.safetensors"
_METADATA_KEYS = ("format", "format_version", "rule", "config", "recipe", "evaluation")


class WeightsError(ValueError):
    """A weight file or name that cannot be used; the message says what to do."""


# ----------------------------------------------------------------------------------- bundled files
def pretrained_dir() -> Path:
    """The folder holding the bundled weights: package data when installed, ``pretrained/`` in a checkout."""
    try:
        from importlib.resources import files

        path = Path(str(files("learned_optim.pretrained")))
        if (path / "registry.json").is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "pretrained"


def registry() -> dict[str, dict[str, Any]]:
    path = pretrained_dir() / "registry.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def available_weights(rule: str | None = None) -> list[str]:
    """Names of the bundled weights (optionally only those of one rule)."""
    return sorted(name for name, entry in registry().items() if rule is None or entry["rule"] == rule)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of what a weight file *computes*: its rule, config and tensors (names, dtypes, shapes, bytes).

    Unlike :func:`sha256_file` it ignores the provenance metadata (recipe, evaluation, version), so re-exporting
    the same weights with an updated model card keeps the digest; evaluations are keyed on it. Config keys at
    the value their absence means (``Rule.legacy_config``) are left out, so a file written before such a key
    existed and the same weights re-exported with it spelled out share a digest.
    """
    from safetensors import safe_open

    meta = read_metadata(path)
    legacy = RULES[meta["rule"]].legacy_config
    config = {k: v for k, v in meta["config"].items() if k not in legacy or legacy[k] != v}
    digest = hashlib.sha256(json.dumps({"rule": meta["rule"], "config": config}, sort_keys=True).encode())
    with safe_open(str(path), framework="pt") as fh:
        for key in sorted(fh.keys()):
            tensor = fh.get_tensor(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- resolution
def parse_hf_spec(spec: str) -> tuple[str, str, str | None]:
    """``hf://org/repo[/path/file][@revision]`` -> (repo_id, filename, revision)."""
    if not isinstance(spec, str) or not spec.startswith("hf://"):
        raise WeightsError(f"Invalid hub reference {spec!r}: expected hf://org/repo[/file][@revision]")
    body = spec[len("hf://"):]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision:
            raise WeightsError(f"Empty revision in {spec!r}; write hf://org/repo/file@REVISION or drop the '@'")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise WeightsError(f"Invalid hub reference {spec!r}: expected hf://org/repo[/file][@revision]")
    filename = "/".join(parts[2:]) or DEFAULT_HUB_FILENAME
    return f"{parts[0]}/{parts[1]}", filename, revision


def resolve_weights(spec: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool | None = None, endpoint: str | None = None, token: str | bool | None = None
                    ) -> Path:
    """Turn a weights name, path or ``hf://`` reference into a verified local file path."""
    spec_str = os.fspath(spec)
    reg = registry()
    if spec_str in reg:
        entry = reg[spec_str]
        path = pretrained_dir() / entry["file"]
        if not path.is_file():
            raise WeightsError(f"Bundled weights {spec_str!r} are registered but {path} is missing; "
                               "reinstall learned-optim (the wheel ships the files in learned_optim/pretrained)")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise WeightsError(f"Bundled weights {spec_str!r} at {path} do not match their pinned sha256 "
                               f"({actual} != {entry['sha256']}); the file is corrupted, reinstall learned-optim")
        return path
    if spec_str.startswith("hf://"):
        repo_id, filename, rev = parse_hf_spec(spec_str)
        return _hub_download(repo_id, filename, revision=rev or revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, endpoint=endpoint, token=token)
    path = Path(spec_str).expanduser()
    if path.is_file():
        return path
    known = ", ".join(sorted(reg)) or "none bundled yet"
    raise WeightsError(f"Unknown weights {spec_str!r}: not a bundled name (known: {known}), not an existing file, "
                       "and not a hub reference (hf://org/repo[/file][@revision])")


def _hub_download(repo_id: str, filename: str, *, revision, cache_dir, local_files_only, endpoint, token) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    kwargs = dict(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir, token=token)
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    # Order matters: LocalEntryNotFoundError is a subclass of EntryNotFoundError (huggingface_hub 0.x-2.x),
    # so the "not cached / offline" case must be caught before the "no such file in the repo" case.
    try:
        return Path(huggingface_hub.hf_hub_download(**kwargs))
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
        raise WeightsError(f"Cannot download hf://{where}: the hub is unreachable or offline mode is on "
                           "(HF_HUB_OFFLINE / local_files_only), and no copy is in the cache "
                           f"({cache_dir or 'default HF cache'}). Connect once to fill the cache, or pass a local "
                           "path to the .safetensors file") from exc
    except errors.RepositoryNotFoundError as exc:
        raise WeightsError(f"Hub repository {repo_id!r} does not exist (or is private: pass token=...); "
                           f"check the name in hf://{where}") from exc
    except errors.RevisionNotFoundError as exc:
        raise WeightsError(f"Revision {revision!r} does not exist in hub repository {repo_id!r}") from exc
    except errors.EntryNotFoundError as exc:
        raise WeightsError(f"Hub repository {repo_id!r} has no file {filename!r} at "
                           f"{revision or 'main'}; check hf://{where}") from exc
    except errors.HfHubHTTPError as exc:  # 401/403 and other refusals not covered above
        raise WeightsError(f"The hub refused hf://{where} ({exc}); check the reference and token=") from exc
    except errors.HFValidationError as exc:  # malformed repo id / revision
        raise WeightsError(f"Invalid hub reference hf://{where}: {exc}") from exc


# ----------------------------------------------------------------------------------- file I/O
def save_weights(rule: Rule, path: str | os.PathLike, *, recipe: dict | None = None,
                 evaluation: dict | None = None) -> Path:
    """Write ``rule`` with its provenance to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    from . import __version__

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rule.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "rule": rule.name,
                "config": json.dumps(rule.config(), sort_keys=True), "recipe": json.dumps(recipe or {}, sort_keys=True),
                "evaluation": json.dumps(evaluation or {}, sort_keys=True), "learned_optim_version": __version__}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    _canonicalise_header(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _canonicalise_header(path: Path) -> None:
    """Rewrite the JSON header of a safetensors file with sorted keys, in place.

    safetensors keeps the metadata in a hash map, so its order changes from one save to the next;
    sorted, the same weights and metadata give the same bytes (a resumed meta-training run is
    bit-identical to an uninterrupted one). The header keeps its length, so no offset moves.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > size:  # cannot happen for a header safetensors wrote; leave the file as it is
            return
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated metadata of a weight file, JSON fields decoded."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or not a "
                           "learned_optim weight file: re-download it or re-export it with meta_train") from exc
    if raw.get("format") != FORMAT:
        raise WeightsError(f"{path} is a safetensors file but not a learned_optim weight file (metadata "
                           f"'format' is {raw.get('format')!r}); export weights with learned_optim.save_weights")
    if raw.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path} has format version {raw.get('format_version')!r}; this learned_optim reads "
                           f"version {FORMAT_VERSION}: upgrade learned-optim")
    missing = [k for k in _METADATA_KEYS if k not in raw]
    if missing:
        raise WeightsError(f"{path} lacks metadata {missing}; re-export it with learned_optim.save_weights")
    meta = dict(raw)
    for key in ("config", "recipe", "evaluation"):
        try:
            meta[key] = json.loads(raw[key])
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{path}: metadata {key!r} is not valid JSON") from exc
    if meta["rule"] not in RULES:
        raise WeightsError(f"{path} holds weights for unknown rule {meta['rule']!r}; known: {sorted(RULES)}")
    return meta


def load_rule(path: str | os.PathLike, *, rule: str | None = None, config: dict | None = None) -> Rule:
    """Build the rule stored in ``path`` and load its weights with ``strict=True``.

    ``rule``/``config``: what the caller expects; a file for another rule, or with another
    config, is refused with a message naming both.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if rule is not None and meta["rule"] != rule:
        raise WeightsError(f"{path} holds {meta['rule']!r} weights but a {rule!r} rule was asked for; use "
                           f"learned_optim.{_CLASS_FOR_RULE.get(meta['rule'], 'LearnedOptimizer')} for this file")
    stored = stored_config(meta["rule"], meta["config"])
    if config is not None:
        try:
            expected = build_rule(meta["rule"], config).config()
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"The requested config {config} does not fit rule {meta['rule']!r} ({exc}); "
                               f"{path} was trained with {stored}") from exc
        if expected != stored:
            raise WeightsError(f"{path} was trained with config {stored}, which does not match the "
                               f"requested {expected}; drop the config override or use matching weights")
    try:
        module = build_rule(meta["rule"], stored)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: config {meta['config']} does not fit rule {meta['rule']!r} ({exc})") from exc
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path} is truncated or corrupted ({exc}); re-download or re-export it") from exc
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: tensors do not match rule {meta['rule']!r} with config {meta['config']} "
                           f"({exc}); the file is damaged or was written by incompatible code") from exc
    return module


_CLASS_FOR_RULE = {"dm": "L2ODM", "rnnprop": "RNNprop", "scale": "L2OScale"}


# ----------------------------------------------------------------------------------- model cards & hub upload
def model_card(path: str | os.PathLike, *, name: str | None = None, license: str = "mit") -> str:
    """README-style model card (YAML front matter + prose) from a weight file's metadata."""
    meta = read_metadata(path)
    name = name or Path(path).stem
    cls = _CLASS_FOR_RULE[meta["rule"]]
    recipe, evaluation = meta["recipe"], meta["evaluation"]
    lines = ["---", f"license: {license}", "library_name: learned-optim", "tags:", "- learned-optimizer",
             f"- {meta['rule']}", "- pytorch", "datasets:", "- mnist", "---", "", f"# {name}", "",
             f"A learned optimizer ({cls}, rule `{meta['rule']}`) for `learned_optim`, meta-trained with this "
             "project's own `meta_train`.", "", "```python", "import learned_optim",
             f"opt = learned_optim.{cls}(model.parameters(), weights={name!r})", "```", "",
             "## Rule config", "", "```json", json.dumps(meta["config"], indent=2, sort_keys=True), "```", "",
             "## Training recipe (as run)", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", "",
             "## Evaluation", ""]
    if evaluation:
        lines += ["```json", json.dumps(evaluation, indent=2, sort_keys=True), "```"]
    else:
        lines += ["Not evaluated yet."]
    lines += ["", f"sha256 of the weight file: `{sha256_file(path)}`",
              f"digest of its rule, config and tensors (what evaluations are keyed on): `{weights_digest(path)}`", ""]
    return "\n".join(lines)


def publish(path: str | os.PathLike, repo_id: str, *, filename: str = DEFAULT_HUB_FILENAME, card: str | None = None,
            token: str | None = None, revision: str | None = None, endpoint: str | None = None,
            create_repo: bool = True) -> str:
    """Upload a weight file and its model card (``README.md``) to a hub model repo; returns the hf:// reference."""
    from huggingface_hub import HfApi

    read_metadata(path)  # refuse to publish anything that would not load
    api = HfApi(endpoint=endpoint, token=token)
    if create_repo:
        api.create_repo(repo_id, exist_ok=True)
    api.upload_file(path_or_fileobj=str(path), path_in_repo=filename, repo_id=repo_id, revision=revision)
    api.upload_file(path_or_fileobj=(card or model_card(path)).encode(), path_in_repo="README.md", repo_id=repo_id,
                    revision=revision)
    return f"hf://{repo_id}/{filename}" + (f"@{revision}" if revision else "")
