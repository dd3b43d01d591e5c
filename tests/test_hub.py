"""P3 and the model read from the Hugging Face hub (sources/hub.py, sources.p3.Source, sources.t5_weights.resolve), against the
local hub emulator (tests/hub_emulator.py) at P3's real size: 2,085 configs, a 1.5 MB README.

Every test points huggingface_hub at the emulator (`use_hub`, which also undoes CI's HF_HUB_OFFLINE=1), counts the
requests it receives and records every host name resolved, so a request anywhere else would show. The reference for
what the hub serves is the emulator's own directory, which is a local P3 mirror (`<config>/<split>-*.parquet`) and a
local model directory: the hub source must give exactly what the local source gives.
"""
import csv
import json
import os
import shutil
import socket
import time

import pytest

import data
from sources import p3
import evaluate
from sources import hub as hub_io
from sources import t5_weights
import train
from hub_emulator import HubEmulator, make_p3_repo, make_t5_model_repo, use_hub

pytestmark = pytest.mark.slow  # the hub emulator at P3's size

P3, MODEL = "bigscience/P3", "google/t5-small-lm-adapt"
REAL = "super_glue_cb_GPT_3_style"  # the config with rows of its own: 256 rows in 4 row groups, > 64 KB
LISTING, PER_CONFIG = 20, 5  # the request budget: the listing, then each config opened


def _table(name):
    """The config names of a packaged task table (p3/), in its order."""
    with open(os.path.join(p3.TABLE_DIR, name), newline="") as f:
        return [r["p3_config"] for r in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def big_root(tmp_path_factory):
    """P3 at its real size, and a google/t5-small-lm-adapt of tiny dims (the vocabulary is T5's 32128: the
    emulated P3 holds ids up to 32000) with the demo's spiece.model."""
    root = tmp_path_factory.mktemp("hub")
    make_p3_repo(root, real_configs=[REAL])
    make_t5_model_repo(root, MODEL, vocab_size=32128, spiece_model=os.path.join(data.demo_dir(), "spiece.model"))
    return root


@pytest.fixture(scope="module")
def big_server(big_root):
    with HubEmulator(big_root) as emulator:
        yield emulator


def _point_at(monkeypatch, url, tmp_path):
    """huggingface_hub at `url`, a fresh cache, no listing kept from an earlier test, host names recorded."""
    hosts, real = [], socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: hosts.append(host) or real(host, *a, **k))
    use_hub(monkeypatch, url, tmp_path / "hf_home")
    hub_io.forget_snapshots()
    return hosts


@pytest.fixture
def big(big_server, tmp_path, monkeypatch):
    big_server.hosts = _point_at(monkeypatch, big_server.url, tmp_path)
    big_server.reset_counts()
    yield big_server
    hub_io.forget_snapshots()


def p3_requests(hub):
    """(listing requests, range reads, configs read) among the emulator's requests for bigscience/P3."""
    listing = [r for r in hub.requests if r.path.startswith(f"/api/datasets/{P3}")]
    reads = [r for r in hub.requests if r.path.startswith(f"/datasets/{P3}/resolve/")]
    return listing, reads, {r.path.split("/")[6] for r in reads}


def assert_within_budget(hub):
    listing, reads, configs = p3_requests(hub)
    sha = hub_io.snapshot(P3).sha
    assert 0 < len(listing) <= LISTING and len(reads) <= PER_CONFIG * len(configs), (len(listing), len(reads))
    assert all(r.path.startswith(f"/datasets/{P3}/resolve/{sha}/") and r.headers.get("range") for r in reads)
    others = [r.path for r in hub.requests if not r.path.startswith(
        (f"/api/datasets/{P3}", f"/datasets/{P3}/", f"/api/models/{MODEL}", f"/{MODEL}/resolve/"))]
    assert not others and set(hub.hosts) <= {"127.0.0.1"}, (others, hub.hosts)
    return len(listing), len(reads), len(configs)


# ----------------------------------------------------------------------------------------------- end to end
def _train(tmp_path, name, data_source, model):
    argv = ["--data", data_source, "--model", model, "--out", str(tmp_path / name), "--steps", "2",
            "--batch-size", "2", "--input-length", "128", "--target-length", "16", "--log-every", "1",
            "--save-every", "2", "--device", "cpu", "--dtype", "float32", "--adafactor-step-offset", "0"]
    assert train.cli(argv) == 0
    with open(tmp_path / name / "log.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def test_train_on_hub_names_matches_local_copies(big, big_root, tmp_path):
    """train.py --data bigscience/P3 --model google/t5-small-lm-adapt trains from the hub in at most 20 listing
    requests + 5 per config opened, all at the listing's commit, and logs the losses of the same run on local copies."""
    hub_losses = _train(tmp_path, "hub", P3, MODEL)
    listing, reads, configs = assert_within_budget(big)
    print(f"\ntrain.py from the hub: {listing} listing requests, {reads} range reads over {configs} configs")
    local = _train(tmp_path, "local", str(big_root / "datasets" / P3), str(big_root / "models" / MODEL))
    assert len(hub_losses) == 2 and hub_losses == local


def test_evaluate_on_hub_names_matches_local_copies(big, big_root, tmp_path):
    """evaluate.py --model google/t5-small-lm-adapt --data bigscience/P3 (2 examples of each CB and RTE template)
    reads the hub within the request budget and scores exactly as on local copies."""
    common = ["--datasets", "cb,rte", "--max-examples", "2", "--batch-size", "2", "--input-length", "64",
              "--target-length", "8", "--device", "cpu", "--dtype", "float32"]
    hub = evaluate.main(["--model", MODEL, "--data", P3, "--out", str(tmp_path / "hub"), *common])
    listing, reads, configs = assert_within_budget(big)
    print(f"\nevaluate.py from the hub: {listing} listing requests, {reads} range reads over {configs} configs")
    local = evaluate.main(["--model", str(big_root / "models" / MODEL), "--data", str(big_root / "datasets" / P3),
                           "--out", str(tmp_path / "local"), *common])
    assert configs == 25 and hub["tasks"] == local["tasks"]


def test_first_batch_at_the_papers_shape(big, big_root):
    """The first batch of 32 packed rows of 1024 / 256 tokens from the 2,085-config hub repository costs at most
    20 listing requests + 5 per config opened, and equals the batch read from the local copy."""
    start = time.perf_counter()
    mix = data.Mixture(P3, batch_size=32, input_length=1024, target_length=256)
    batch = mix.next_batch()
    seconds = time.perf_counter() - start
    listing, reads, configs = assert_within_budget(big)
    assert configs == sum(s.units is not None for s in mix.streams.values()) > 100
    print(f"\nfirst batch at 32 x 1024/256: {seconds:.1f} s, {listing} listing requests + {reads} range reads, "
          f"{configs} configs opened")
    local = data.Mixture(str(big_root / "datasets" / P3), batch_size=32).next_batch()
    assert {k: v.tolist() for k, v in batch.items()} == {k: v.tolist() for k, v in local.items()}


def test_eval_data_of_the_111_held_out_configs(big, big_root):
    """load_eval over the 111 held-out configs (3 examples each) reads each config once, within 20 listing requests
    + 5 per config (and 1,000 in all), and equals what the local copy gives."""
    start = time.perf_counter()
    sets = data.load_eval(P3, max_examples=3)
    seconds = time.perf_counter() - start
    listing, reads, configs = assert_within_budget(big)
    assert configs == 111 and listing + reads <= 1000
    print(f"\nload_eval over 111 configs: {seconds:.1f} s, {listing} listing requests + {reads} range reads")
    assert sets == data.load_eval(str(big_root / "datasets" / P3), max_examples=3)


# ----------------------------------------------------------------------------------------------- failures
@pytest.fixture
def small(tmp_path, monkeypatch):
    """A 4-config P3 (3 training configs and one held-out one) served by its own emulator."""
    configs = [REAL, "glue_mrpc_equivalent", "glue_qqp_duplicate_or_not", "super_glue_cb_GPT_3_style_score_eval"]
    make_p3_repo(tmp_path / "small", configs, readme_bytes=0, real_configs=[REAL])
    monkeypatch.setattr(hub_io, "RETRY_WAIT", 0.01)
    with HubEmulator(tmp_path / "small") as emulator:
        emulator.hosts = _point_at(monkeypatch, emulator.url, tmp_path)
        emulator.dir = tmp_path / "small" / "datasets" / P3
        yield emulator
    hub_io.forget_snapshots()


def _reads_of(hub, name):
    return [r.headers["range"] for r in hub.requests if r.method == "GET" and name in r.path]


def test_interrupted_read_is_retried(small):
    """A range read cut short (fewer bytes than announced, then EOF) is retried once and the batches are those of
    the local copy; every other read is made once, and the 168 KB file is never fetched in full."""
    path = f"{REAL}/train-00000-of-00001.parquet"
    small.truncate_paths = {path: 100}
    kwargs = dict(tasks=[REAL], batch_size=8, input_length=256, target_length=8, seed=1)
    hub = data.Mixture(P3, **kwargs)
    got = [hub.next_batch() for _ in range(6)]
    ranges = _reads_of(small, path)
    assert not small.truncate_paths and ranges[0] == ranges[1] and len(set(ranges)) == len(ranges) - 1
    spans = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in set(ranges)]
    assert sum(b - a + 1 for a, b in spans) < (small.dir / path).stat().st_size  # never fetched in full
    local = data.Mixture(str(small.dir), **kwargs)
    for a in got:
        b = local.next_batch()
        assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}


@pytest.mark.parametrize("status,tries", [(503, hub_io.RETRIES + 1), (404, 1)])
def test_failed_read_is_one_line_naming_repo_config_and_file(small, status, tries):
    """HTTP 503 is retried RETRIES times, 404 not at all; then one line names the repository, commit, config and
    file, and the cause."""
    path = f"{REAL}/validation-00000-of-00001.parquet"
    small.fail_paths = {path: status}
    with pytest.raises(OSError) as err:  # CB is not a training dataset: its rate is its row count, read at once
        data.Mixture(P3, tasks=[REAL], split="validation", batch_size=2, input_length=64, target_length=8)
    message = str(err.value)
    sha = hub_io.snapshot(P3).sha
    assert "\n" not in message and f"hf://datasets/{P3}@{sha}/{path}" in message and f"HTTP {status}" in message
    assert len(_reads_of(small, path)) == tries and (f"tried {tries} times" in message) == (tries > 1)


def test_corrupt_parquet_is_one_line_naming_the_file(small):
    """A hub file that is not parquet fails with one line naming its hf:// address, its config and the fix."""
    target = small.dir / "glue_mrpc_equivalent" / "train-00000-of-00001.parquet"
    target.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(ValueError) as err:
        data.Mixture(P3, tasks=["glue_mrpc_equivalent"], batch_size=2, input_length=64, target_length=8).next_batch()
    message = str(err.value)
    assert "\n" not in message and "glue_mrpc_equivalent/train-00000-of-00001.parquet" in message
    assert "config 'glue_mrpc_equivalent'" in message and "hub's copy is damaged" in message


def test_missing_table_configs_are_one_line_and_a_file(small, tmp_path):
    """The 311 training-table configs the 4-config repository lacks (it has 2): one warning line with the count and
    three names; the full list, as the table minus the repository's folders, in notice_dir/missing_train_configs.txt."""
    with pytest.warns(UserWarning) as record:
        mix = data.Mixture(P3, notice_dir=str(tmp_path / "run"), batch_size=2, input_length=64, target_length=8)
    message = [str(w.message) for w in record if w.category is UserWarning][0]
    have = {d for d in os.listdir(small.dir) if (small.dir / d).is_dir()}
    expected = [c for c in _table(data.TRAIN_TABLE) if c not in have]
    listed = (tmp_path / "run" / "missing_train_configs.txt").read_text().splitlines()
    assert listed == expected and len(expected) == 311 and message.startswith("311 of the 313 tasks")
    assert "\n" not in message and ", ".join(expected[:3]) + " and 308 more" in message
    assert str(tmp_path / "run" / "missing_train_configs.txt") in message and len(mix.tasks) == 2


def _one_error_line(capsys, argv):
    assert train.cli(argv) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_unreachable_and_offline_hub_are_one_line(tmp_path, monkeypatch, capsys):
    """An unreachable hub (a closed port) ends train.py with one error line naming the repository and the cause,
    and writes nothing; offline mode is one line too."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    _point_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--data", P3, "--out", str(tmp_path / "run"), "--device", "cpu"]
    line = _one_error_line(capsys, argv)
    assert f"'{P3}': no such directory" in line and f"127.0.0.1:{port}) could not be reached" in line
    assert not os.path.exists(tmp_path / "run")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as err:
        data.Mixture(P3)
    line = str(err.value)
    assert "\n" not in line and "offline mode (HF_HUB_OFFLINE=1)" in line and f"hf download {P3}" in line


def test_paths_that_are_not_directories(small, tmp_path, monkeypatch, capsys):
    """--data data/P3 and --model ckpt/t5 (no such directories) are reported as such and, being possible hub names,
    as repositories the hub does not have; ./data/P3 and ./ckpt/t5 only as missing directories."""
    monkeypatch.chdir(tmp_path)
    base = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    line = _one_error_line(capsys, ["--model", "tiny", "--data", "data/P3", *base])
    assert "'data/P3': no such directory" in line and "no dataset repository 'data/P3' on the Hugging Face hub" in line
    line = _one_error_line(capsys, ["--model", "tiny", "--data", "./data/P3", *base])
    assert "'./data/P3': no such directory" in line and "repository" not in line
    with pytest.raises(FileNotFoundError, match="'ckpt/t5': no such directory.*no model repository 'ckpt/t5'"):
        t5_weights.resolve("ckpt/t5")
    with pytest.raises(FileNotFoundError, match=r"'\./ckpt/t5': no such directory .*not a hub name"):
        t5_weights.resolve("./ckpt/t5")


# ----------------------------------------------------------------------------------------------- moved mirrors
def test_resume_with_a_moved_mirror_or_another_mixture(tmp_path, monkeypatch, capsys):
    """A run resumes from a mirror moved elsewhere (same tasks) with a note; a --data with another task set is
    refused before the model is built, naming the difference."""
    first, moved, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    shutil.copytree(data.demo_dir(), first)
    argv = ["--preset", "demo", "--out", str(tmp_path / "run"), "--batch-size", "2", "--input-length", "32",
            "--target-length", "8", "--save-every", "1", "--no-evaluate", "--device", "cpu"]
    assert train.cli([*argv, "--data", str(first), "--steps", "1"]) == 0
    shutil.move(first, moved)
    capsys.readouterr()
    assert train.cli([*argv, "--data", str(moved), "--steps", "2"]) == 0
    assert f"with --data {moved} (it trained on --data {first}): the same 12 tasks" in capsys.readouterr().out
    shutil.copytree(moved, other)
    shutil.rmtree(other / "demo_review_sentiment")
    from runner import build
    monkeypatch.setattr(build, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    line = _one_error_line(capsys, [*argv, "--data", str(other), "--steps", "3"])
    assert "trained on another mixture (12 tasks" in line and "gives 11 tasks: 1 of the run's missing" in line
    assert "demo_review_sentiment" in line
