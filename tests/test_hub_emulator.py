"""The hub emulator against the real clients: huggingface_hub (HfApi, hf_hub_download, snapshot_download, HfFileSystem)
and `datasets`, with HF_ENDPOINT pointed at it and nothing else reachable.

huggingface_hub and datasets read HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME once, at import, into module constants
(`huggingface_hub.constants.ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HUB_OFFLINE`, ...; `datasets.config.
HF_ENDPOINT`, `HF_HUB_OFFLINE`, ...), so `hub_emulator.use_hub` sets the environment and monkeypatches those
constants; the calls below then rely on the defaults (no `endpoint=`), as the project's code does.
"""
import hashlib
import json
import os
import socket
import threading

import pyarrow.parquet as pq
import pytest
from huggingface_hub import HfApi, HfFileSystem, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from hub_emulator import HubEmulator, make_p3_repo, make_t5_model_repo, use_hub

pytestmark = pytest.mark.slow  # an HTTP server and datasets' reader

MODEL = "google/t5-small-lm-adapt"
REAL = "super_glue_cb_GPT_3_style"  # the one P3 config with rows of its own (several row groups)
HUB_PREFIXES = ("/api/models/", "/api/datasets/", "/datasets/", f"/{MODEL}/")


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    configs = make_p3_repo(root, real_configs=[REAL])
    make_t5_model_repo(root, MODEL)
    return root, configs


@pytest.fixture
def hub(hub_root, tmp_path, monkeypatch):
    hosts = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # every connection the clients open resolves its host here first
        hosts.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with HubEmulator(hub_root[0]) as emulator:
        use_hub(monkeypatch, emulator.url, tmp_path / "hf_home")
        emulator.hosts = hosts
        yield emulator
        HfFileSystem.clear_instance_cache()


def _repo_files(root, kind, repo_id):
    top = os.path.join(root, kind, *repo_id.split("/"))
    return {os.path.relpath(os.path.join(d, f), top).replace(os.sep, "/") for d, _, fs in os.walk(top) for f in fs}


def test_list_repo_tree_paginates_through_2085_configs(hub, hub_root):
    root, configs = hub_root
    assert len(configs) == len(set(configs)) == 2085
    entries = list(HfApi().list_repo_tree("bigscience/P3", repo_type="dataset", recursive=True))
    files = {e.path: e for e in entries if isinstance(e, RepoFile)}
    assert set(files) == _repo_files(root, "datasets", "bigscience/P3")
    assert {e.path for e in entries if isinstance(e, RepoFolder)} == set(configs)
    pages = [r for r in hub.requests if r.path.startswith("/api/datasets/bigscience/P3/tree/main")]
    assert len(pages) == -(-len(entries) // 1000) > 1  # 1000 entries a page, followed through Link: rel="next"
    parquet = files[f"{REAL}/train-00000-of-00001.parquet"]
    data = (root / "datasets/bigscience/P3" / parquet.path).read_bytes()
    assert parquet.size == len(data) and parquet.lfs.sha256 == hashlib.sha256(data).hexdigest()
    readme = files["README.md"]
    assert readme.lfs is None and 1_400_000 < readme.size < 1_600_000


def test_hf_hub_download_and_metadata(hub, hub_root):
    root = hub_root[0] / "models" / MODEL
    sha = HfApi().model_info(MODEL).sha
    path = hf_hub_download(MODEL, "model.safetensors")
    data = (root / "model.safetensors").read_bytes()
    assert open(path, "rb").read() == data and f"/snapshots/{sha}/" in path
    meta = get_hf_file_metadata(hf_hub_url(MODEL, "model.safetensors"))
    assert (meta.etag, meta.size, meta.commit_hash) == (hashlib.sha256(data).hexdigest(), len(data), sha)
    config = (root / "config.json").read_bytes()
    meta = get_hf_file_metadata(hf_hub_url(MODEL, "config.json"))  # not LFS: the git blob sha1
    assert meta.etag == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest() and meta.size == len(config)
    gets = hub.count("/resolve/", "GET")
    assert hf_hub_download(MODEL, "model.safetensors") == path and hub.count("/resolve/", "GET") == gets  # cached
    local = snapshot_download(MODEL)
    assert {f: open(os.path.join(local, f), "rb").read() for f in _repo_files(hub_root[0], "models", MODEL)} == \
        {f: (root / f).read_bytes() for f in _repo_files(hub_root[0], "models", MODEL)}
    assert json.loads(config)["tie_word_embeddings"] is False
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert {"lm_head.weight", "shared.weight", "decoder.block.1.layer.1.EncDecAttention.o.weight",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"} <= set(f.keys())
        assert list(f.get_slice("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").get_shape()) == [32, 16]


def test_missing_file_repo_and_revision_raise_the_hub_errors(hub):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(MODEL, "no_such_file.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("google/no-such-model", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().dataset_info("bigscience/P4")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(MODEL, "config.json", revision="v9")
    assert not HfFileSystem().exists(f"datasets/bigscience/P3/{REAL}/test-00000-of-00001.parquet")


def test_hffs_reads_a_parquet_row_group_with_byte_ranges(hub, hub_root):
    path = f"datasets/bigscience/P3/{REAL}/train-00000-of-00001.parquet"
    local = hub_root[0] / path
    fs = HfFileSystem()
    assert fs.info(path)["size"] == local.stat().st_size
    hub.reset_counts()
    with fs.open(path, "rb", block_size=2048) as f:
        pf = pq.ParquetFile(f)
        assert pf.num_row_groups == 4
        got = pf.read_row_group(0)
    assert got.equals(pq.ParquetFile(local).read_row_group(0))
    reads = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    spans = [tuple(map(int, r.headers["range"].removeprefix("bytes=").split("-"))) for r in reads]
    assert reads and all(r.headers.get("range") for r in reads)
    assert sum(b - a + 1 for a, b in spans) < local.stat().st_size  # never fetched in full


def test_interrupted_download_is_retried_and_failures_surface(hub, hub_root):
    data = (hub_root[0] / "models" / MODEL / "model.safetensors").read_bytes()
    hub.truncate_paths = {"model.safetensors": len(data) // 2}  # the next response body stops half-way
    path = hf_hub_download(MODEL, "model.safetensors")
    assert open(path, "rb").read() == data and not hub.truncate_paths
    # huggingface_hub buffers 10 MB chunks, so a smaller file cut short is fetched again from its start
    gets = [r for r in hub.requests if r.method == "GET" and "model.safetensors" in r.path]
    assert len(gets) == 2
    hub.fail_paths = {"/api/datasets/bigscience/P3/tree": 403}
    with pytest.raises(HfHubHTTPError) as err:
        list(HfApi().list_repo_tree("bigscience/P3", repo_type="dataset"))
    assert err.value.response.status_code == 403


def test_datasets_resolves_configs_and_data_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # A 3-config P3: `datasets` parses the README's YAML with pure-Python PyYAML, ~10 s for the 2085-config card.
    configs = make_p3_repo(tmp_path / "hub", [REAL, f"{REAL}_score_eval", "glue_mrpc_equivalent"], readme_bytes=0,
                           real_configs=[REAL])
    with HubEmulator(tmp_path / "hub") as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        sha = HfApi().dataset_info("bigscience/P3").sha
        assert sorted(datasets.get_dataset_config_names("bigscience/P3")) == configs
        builder = datasets.load_dataset_builder("bigscience/P3", REAL)
        expected = f"hf://datasets/bigscience/P3@{sha}/{REAL}/{{}}-00000-of-00001.parquet"
        assert {s: list(f) for s, f in builder.config.data_files.items()} == {
            s: [expected.format(s)] for s in ("train", "validation")}
        assert builder.info.features["answer_choices"].feature.dtype == "string"
        paths = {r.path.split("?")[0] for r in hub.requests}
        assert all(p.startswith(HUB_PREFIXES) for p in paths) and not [p for p in paths if "datasets-server" in p]
    HfFileSystem.clear_instance_cache()


def test_only_the_emulator_is_contacted(hub):
    assert len(list(HfApi().list_repo_tree("bigscience/P3", REAL, repo_type="dataset"))) == 2
    hf_hub_download(MODEL, "config.json")
    with HfFileSystem().open(f"datasets/bigscience/P3/{REAL}/validation-00000-of-00001.parquet") as f:
        pq.read_metadata(f)
    paths = [r.path for r in hub.requests]
    assert paths and all(p.startswith(HUB_PREFIXES) or p == "/api/agent-harnesses" for p in paths), paths
    assert not [p for p in paths if "datasets-server" in p or "telemetry" in p]
    assert set(hub.hosts) == {"127.0.0.1"}, hub.hosts  # any other host would have been resolved first


def test_stop_closes_kept_alive_connections_and_threads(hub_root):
    with HubEmulator(hub_root[0]) as emulator:
        conn = socket.create_connection(("127.0.0.1", int(emulator.url.rsplit(":", 1)[1])))
        conn.sendall(b"GET /api/models/google/t5-small-lm-adapt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.makefile("rb").readline().startswith(b"HTTP/1.1 200")  # kept alive in a handler thread
    assert not [t for t in threading.enumerate() if t.name.startswith("hub-emulator")]
    conn.close()


def test_use_hub_patches_the_clients_constants_and_restores_them(tmp_path):
    import huggingface_hub.constants as c
    datasets_config = pytest.importorskip("datasets.config")
    state = lambda: (c.ENDPOINT, c.HUGGINGFACE_CO_URL_TEMPLATE, c.HF_HUB_OFFLINE, c.HF_HUB_CACHE,  # noqa: E731
                     datasets_config.HF_ENDPOINT, datasets_config.HF_HUB_OFFLINE, os.environ.get("HF_ENDPOINT"))
    before = state()
    with pytest.MonkeyPatch.context() as mp:
        use_hub(mp, "http://127.0.0.1:9", tmp_path)
        assert state() == ("http://127.0.0.1:9", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}", False,
                           str(tmp_path / "hub"), "http://127.0.0.1:9", False, "http://127.0.0.1:9")
        assert hf_hub_url(MODEL, "config.json") == f"http://127.0.0.1:9/{MODEL}/resolve/main/config.json"
    assert state() == before
