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


def user_weights_dir() -> Path:
    """Where ``meta_train.export`` puts your own weights: ``$LEARNED_OPTIM_HOME/weights``, else
    ``~/.cache/learned_optim/weights``. Names exported there resolve like bundled ones."""
    home = os.environ.get("LEARNED_OPTIM_HOME")
    return (Path(home).expanduser() if home else Path("~/.cache/learned_optim").expanduser()) / "weights"


def read_registry(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``folder/registry.json``: {name: {"file", "sha256", "rule"}} (empty when there is none)."""
    path = Path(folder) / "registry.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc}); repair or delete it") from exc


def registry() -> dict[str, dict[str, Any]]:
    """The bundled weights: {name: {"file", "sha256", "rule"}}."""
    return read_registry(pretrained_dir())


def _named_entries() -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every name that resolves without a path: bundled, then your exports (which win on a shared name: an
    export over a bundled name needs ``--force``)."""
    names = {name: (pretrained_dir(), entry) for name, entry in registry().items()}
    user = user_weights_dir()
    names.update({name: (user, entry) for name, entry in read_registry(user).items()})
    return names


def available_weights(rule: str | None = None) -> list[str]:
    """Names of the bundled weights and of those you exported (optionally only those of one rule)."""
    return sorted(name for name, (_, entry) in _named_entries().items() if rule is None or entry["rule"] == rule)


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
    reg = _named_entries()
    if spec_str in reg:
        folder, entry = reg[spec_str]
        path = folder / entry["file"]
        bundled = folder == pretrained_dir()
        fix = ("reinstall learned-optim (the wheel ships the files in learned_optim/pretrained)" if bundled else
               f"export it again with python -m meta_train.export RUN_DIR {spec_str} --force")
        if not path.is_file():
            raise WeightsError(f"Weights {spec_str!r} are registered in {folder} but {path} is missing; {fix}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise WeightsError(f"Weights {spec_str!r} at {path} do not match their pinned sha256 "
                               f"({actual} != {entry['sha256']}); the file is corrupted or was replaced: {fix}")
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
    from huggingface_hub import constants, errors

    kwargs = dict(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir, token=token)
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    unreachable = None
    if not local_files_only and not constants.HF_HUB_OFFLINE:
        unreachable = _hub_unreachable(endpoint or constants.ENDPOINT)
        if unreachable is not None:  # no network: use the cache at once instead of retrying for half a minute
            kwargs["local_files_only"] = True
    # Order matters: LocalEntryNotFoundError is a subclass of EntryNotFoundError (huggingface_hub 0.x-2.x),
    # so the "not cached / offline" case must be caught before the "no such file in the repo" case.
    try:
        return Path(huggingface_hub.hf_hub_download(**kwargs))
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
        if unreachable is not None:
            raise WeightsError(f"Cannot download hf://{where}: the hub is unreachable ({unreachable}) and no copy is "
                               f"in the cache ({cache_dir or 'default HF cache'}). Check the network (or HF_ENDPOINT), "
                               "or pass a local path to the .safetensors file") from exc
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


HUB_PROBE_TIMEOUT = 3.0  # seconds to open a TCP connection to the hub before treating it as unreachable
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached (name lookup or TCP connect, within :data:`HUB_PROBE_TIMEOUT`), or None.

    huggingface_hub retries a failed request with back-off for about half a minute; this probe lets a machine
    without network fall back to the cache (or fail) within seconds. Behind a proxy it is skipped."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    url = urlsplit(endpoint)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc.strerror or exc}"
    return None


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
def model_card(weights: str | os.PathLike, *, name: str | None = None, license: str = "mit") -> str:
    """README-style model card (YAML front matter + prose) of a weight file: a bundled or exported name, a path
    or an ``hf://`` reference (anything ``weights=`` takes)."""
    path = Path(weights) if Path(os.fspath(weights)).is_file() else resolve_weights(weights)
    meta = read_metadata(path)
    name = name or (os.fspath(weights) if path != Path(weights) and "/" not in os.fspath(weights)
                    else Path(path).stem)
    cls = _CLASS_FOR_RULE[meta["rule"]]
    recipe, evaluation = meta["recipe"], meta["evaluation"]
    lines = ["---", f"license: {license}", "library_name: learned-optim", "tags:", "- learned-optimizer",
             f"- {meta['rule']}", "- pytorch", "datasets:", "- mnist", "---", "", f"# {name}", "",
             f"A learned optimizer ({cls}, rule `{meta['rule']}`) for `learned_optim`, meta-trained with this "
             "project's own `meta_train`.", "", "```python", "import learned_optim",
             f"opt = learned_optim.{cls}(model.parameters(), weights={name!r})", "```", "",
             *([f"Recipe: {recipe_summary(recipe)}.", ""] if recipe else []),
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


def recipe_summary(recipe: dict) -> str:
    """One line on how a weight file was trained (curriculum, imitation, random scaling, length)."""
    parts = [f"{recipe.get('model', '?')} on {recipe.get('task', '?')}"]
    init = recipe.get("init")
    if init:
        parts.append(f"fine-tuned from {init.get('weights', '?')} ({init.get('recipe', 'recipe unknown')})")
    horizons = recipe.get("horizons") or []
    if recipe.get("curriculum"):
        reached = recipe.get("horizon_reached")
        parts.append(f"curriculum over N = {', '.join(map(str, horizons))}"
                     + (f" (reached N = {reached})" if reached is not None else ""))
    elif horizons:
        parts.append(f"N = {horizons[0]}" + (" (AUG)" if recipe.get("aug") else ""))
    if recipe.get("imitation"):
        ratios = "/".join(f"{r:g}" for r in recipe.get("imitation_ratios", []))
        parts.append(f"imitation of {recipe.get('teacher', 'adam')} (lr {recipe.get('teacher_lr', 0.01):g}), r = {ratios}")
    else:
        parts.append("no imitation")
    if recipe.get("self_improving"):
        parts.append("self-improving")
    scale = recipe.get("random_scale") or 0
    parts.append(f"random scaling B = {scale:g}" if scale else "random scaling off")
    if recipe.get("fixed_validation"):
        parts.append("fixed validation optimizees")
    if recipe.get("valid_horizon") or recipe.get("valid_examples"):
        parts.append("validated" + (f" at N = {recipe['valid_horizon']}" if recipe.get("valid_horizon") else "")
                     + (f" on {recipe['valid_examples']} training examples" if recipe.get("valid_examples") else ""))
    if "epochs_run" in recipe:
        best, at = recipe.get("best_epoch"), recipe.get("best_horizon")
        kept = (f" (the model of epoch {best}" + (f", trained at N = {at}" if at is not None else "") + ")"
                if best is not None and best != recipe["epochs_run"] else "")
        parts.append(f"from a run of {recipe['epochs_run']} epochs{kept}")
    return "; ".join(parts)


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
