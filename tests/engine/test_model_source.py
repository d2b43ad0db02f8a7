"""Model sources: Hub ids through a local Hugging Face cache (HF_HUB_OFFLINE, never the network), object stores
through fsspec's memory filesystem, local directories; the errors that name the model and the cause; one
download per node."""

import threading
import time

import pytest
import torch

from engine.model import LlamaForCausalLM
from engine.weights import ModelSourceError, get_weight_loader, resolve_model
from engine.weights.model_source import HubSource, is_hub_id
from tests.engine.tiny_checkpoints import lay_out_hub_cache, save_tiny_checkpoint, tiny_config


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: nothing may reach the Hub."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("VATTN_CACHE_DIR", str(tmp_path / "vattn-cache"))
    return cache


def loaded_state(resolved) -> dict[str, torch.Tensor]:
    model = LlamaForCausalLM(resolved.hf_config)
    get_weight_loader(resolved, show_progress=False).load_into(model)
    return dict(model.state_dict())


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "model,expected",
    [
        ("meta-llama/Meta-Llama-3-8B-Instruct", True),
        ("Qwen/Qwen2.5-0.5B-Instruct@main", True),
        ("org/name@0123abcd", True),
        ("smollm2", False),
        ("/abs/path", False),
        ("./rel/path", False),
        ("s3://bucket/prefix", False),
    ],
)
def test_hub_ids_are_told_from_paths(model, expected):
    assert is_hub_id(model) is expected


def test_hub_id_resolves_from_the_local_cache(tmp_path, hub_cache):
    src = tmp_path / "src"
    save_tiny_checkpoint(src, "llama", max_shard_size="100KB")
    snapshot = lay_out_hub_cache(hub_cache, "tiny-org/tiny-llama", src)
    resolved = resolve_model("tiny-org/tiny-llama")
    assert resolved.weights_dir == snapshot and resolved.hf_config.hidden_size == 64
    assert_same_weights(loaded_state(resolved), loaded_state(resolve_model(str(src))))


def test_hub_revision_picks_its_snapshot(tmp_path, hub_cache):
    for revision, commit, layers in (("main", "a" * 40, 2), ("v2", "b" * 40, 3)):
        src = tmp_path / revision
        save_tiny_checkpoint(src, "llama", num_hidden_layers=layers)
        lay_out_hub_cache(hub_cache, "tiny-org/tiny-llama", src, revision=revision, commit=commit)
    assert resolve_model("tiny-org/tiny-llama").hf_config.num_hidden_layers == 2
    resolved = resolve_model("tiny-org/tiny-llama@v2")
    assert resolved.hf_config.num_hidden_layers == 3 and resolved.weights_dir.name == "b" * 40
    assert resolve_model(f"tiny-org/tiny-llama@{'b' * 40}").hf_config.num_hidden_layers == 3


@pytest.mark.parametrize("sharded", [True, False])
def test_hub_download_fetches_only_the_files_read(tmp_path, monkeypatch, sharded):
    """Online (stand-ins for ``snapshot_download`` and the file listing serving a repository): the metadata first,
    then only the weights, from the commit the metadata came from: the shards the index names, or without an
    index the top-level *.safetensors; .bin, consolidated and original/ files are never asked for."""
    import fnmatch
    import shutil

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("VATTN_CACHE_DIR", str(tmp_path / "vattn-cache"))
    repo = tmp_path / "repo"
    save_tiny_checkpoint(repo, "mistral", max_shard_size="100KB" if sharded else None, with_tokenizer=True)
    extras = ["pytorch_model.bin", "original/params.json", "original/model.safetensors"]
    if sharded:
        extras.append("consolidated.safetensors")  # another layout of the weights, beside the indexed shards
    for extra in extras:
        (repo / extra).parent.mkdir(exist_ok=True)
        (repo / extra).write_bytes(b"\0")
    repo_files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    commit = "c" * 40
    requested: list[tuple[str, list[str]]] = []

    def fake_snapshot_download(repo_id, *, revision, allow_patterns, cache_dir, local_files_only):
        assert repo_id == "mistral-org/tiny" and not local_files_only
        requested.append((revision, list(allow_patterns)))
        snapshot = tmp_path / "hf-cache" / commit
        for name in repo_files:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(repo / name, snapshot / name)
        return str(snapshot)

    class FakeHfApi:
        def list_repo_files(self, repo_id, revision):
            assert revision == commit
            return repo_files

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    resolved = resolve_model("mistral-org/tiny@v1")
    assert [r for r, _ in requested] == ["v1"]
    assert not list(resolved.weights_dir.glob("*.safetensors"))  # resolution fetches no weights
    state = loaded_state(resolved)
    assert requested[1] == (commit, sorted(p.name for p in repo.glob("model*.safetensors")))
    fetched = {str(p.relative_to(resolved.weights_dir)) for p in resolved.weights_dir.rglob("*") if p.is_file()}
    assert not fetched & set(extras)
    assert_same_weights(state, loaded_state(resolve_model(str(repo))))


def test_hub_id_missing_from_the_cache_offline_names_the_cause(hub_cache):
    with pytest.raises(
        ModelSourceError, match=r"'nobody/nothing'.*not in the local Hugging Face cache.*HF_HUB_OFFLINE"
    ):
        resolve_model("nobody/nothing")


def _hub_error(cls, status: int):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/api/models/org/name"))
    return cls(f"{status} error", response=response)


@pytest.mark.parametrize(
    "error,token,match",
    [
        ("GatedRepoError", None, r"is gated: accept its license.*set HF_TOKEN"),
        ("GatedRepoError", "hf_x", r"HF_TOKEN's account has not been granted access"),
        ("RepositoryNotFoundError", None, r"not found \(a private repository needs HF_TOKEN\)"),
        ("RevisionNotFoundError", None, r"revision 'v9' not found"),
        ("HfHubHTTPError", None, r"not authorized \(HTTP 401\)"),
    ],
)
def test_hub_errors_name_the_model_and_the_cause(monkeypatch, error, token, match):
    import huggingface_hub
    from huggingface_hub import errors

    def fail(*args, **kwargs):
        raise _hub_error(getattr(errors, error), 401 if error != "RevisionNotFoundError" else 404)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    with pytest.raises(ModelSourceError, match=r"model 'org/name@v9': .*" + match):
        HubSource("org/name@v9").fetch_metadata()


def test_no_safetensors_is_refused_at_resolution(tmp_path, hub_cache):
    src = tmp_path / "bin-only"
    src.mkdir()
    tiny_config("llama").save_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelSourceError, match=r"no \*\.safetensors weights"):
        resolve_model(str(src))
    lay_out_hub_cache(hub_cache, "tiny-org/bin-only", src)
    with pytest.raises(ModelSourceError, match=r"'tiny-org/bin-only': no \*\.safetensors weights"):
        resolve_model("tiny-org/bin-only")


def test_unsupported_architecture_is_refused_at_resolution(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(
        tmp_path
    )
    (tmp_path / "model.safetensors").write_bytes(b"\0")
    with pytest.raises(ModelSourceError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        resolve_model(str(tmp_path))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_model(str(tmp_path))


@pytest.fixture
def memory_store(tmp_path, monkeypatch):
    """A sharded tiny checkpoint at memory://ckpt/tiny, and a count of the files copied out of the store."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setenv("VATTN_CACHE_DIR", str(tmp_path / "vattn-cache"))
    src = tmp_path / "src"
    save_tiny_checkpoint(src, "llama", max_shard_size="100KB", with_tokenizer=True)
    fs = fsspec.filesystem("memory")
    for f in src.iterdir():
        fs.pipe(f"/ckpt/tiny/{f.name}", f.read_bytes())
    copied: list[str] = []
    get_file = MemoryFileSystem.get_file

    def counting_get_file(self, rpath, lpath, *args, **kwargs):
        copied.append(rpath.rsplit("/", 1)[-1])
        time.sleep(0.01)  # lets concurrent fetches overlap
        return get_file(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get_file", counting_get_file)
    yield src, copied
    fs.rm("/ckpt", recursive=True)


def test_object_store_prefix_is_copied_once_and_reused(tmp_path, memory_store):
    src, copied = memory_store
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    resolved = resolve_model("memory://ckpt/tiny")
    assert resolved.weights_dir == tmp_path / "vattn-cache" / "remote" / "memory" / "ckpt" / "tiny"
    # Resolution copies the small files only: a deployment checks a model without its weights.
    assert "config.json" in copied and "tokenizer.json" in copied and not set(shards) & set(copied)
    assert_same_weights(loaded_state(resolved), loaded_state(resolve_model(str(src))))
    assert sorted(n for n in copied if n.endswith(".safetensors")) == shards
    copied.clear()
    loaded_state(resolve_model("memory://ckpt/tiny/"))
    assert copied == []


def test_one_process_of_a_node_downloads_the_others_wait(memory_store):
    """Replicas of one node fetching the same model at once: each file is copied once."""
    src, copied = memory_store
    resolved = [resolve_model("memory://ckpt/tiny") for _ in range(3)]
    copied.clear()
    errors: list[BaseException] = []

    def fetch(r):
        try:
            r.source.fetch_weights()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(r,)) for r in resolved]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(copied) == sorted(p.name for p in src.glob("*.safetensors"))


def test_object_store_errors_name_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("VATTN_CACHE_DIR", str(tmp_path / "vattn-cache"))
    with pytest.raises(ModelSourceError, match=r"'file://.*/absent': not found"):
        resolve_model(f"file://{tmp_path}/absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json under this prefix"):
        resolve_model(f"file://{tmp_path}/empty")
    with pytest.raises(ModelSourceError, match="unsupported URL"):
        resolve_model("nosuchfs://bucket/model")


def test_s3_without_s3fs_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    with pytest.raises(ModelSourceError, match=r"s3fs.*vattention-serve\[s3\]"):
        resolve_model("s3://bucket/model")
