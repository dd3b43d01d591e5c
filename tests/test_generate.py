"""generate.py: greedy answers against T5.generate and transformers, --choices against transformers' loss and
evaluate.score_choices, --routing against a brute-force mean of the recorded probabilities, and its errors."""
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from runner import build
from runner.settings import ModelSettings
from sources import demo as demo_data
import evaluate
import generate
import mov
import routing
import t5
from sources import t5_weights
from sources.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = t5.T5Config.preset("tiny")
PROMPTS = ["Someone said: the movie was good and fun. Does the speaker like it? yes or no",
           "Is two less than nine? yes or no", "Pick the bigger number: four or seven."]
CPU = ["--device", "cpu", "--dtype", "float32"]  # fp32 whatever the CPU: the references are fp32


def tiny_mov(experts=4):
    """A tiny MoV model with random (not initial) adapters and a strong EOS row, so some answers end early."""
    model = mov.add_mov(t5.T5(TINY), experts)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
        model.lm_head.weight[1] *= 6.0
    return model.eval()


def vocab():
    return Tokenizer(os.path.join(demo_data.demo_dir(), "spiece.model"))


def test_greedy_batches_equal_t5_generate_one_prompt_at_a_time():
    """greedy() in padded, dummy-filled batches gives each prompt's unpadded T5.generate ids, cut after EOS."""
    model = tiny_mov()
    inputs = [vocab().encode(p) for p in PROMPTS] + [[5, 6, 7]]
    got = generate.greedy(model, inputs, max_new_tokens=7, batch_size=3)
    want = []
    for x in inputs:
        row = model.generate(torch.tensor([x]), max_new_tokens=7)[0].tolist()
        want.append(row[:row.index(1) + 1] if 1 in row else row)
    assert got == want
    assert any(a[-1] == 1 for a in got) and any(len(a) == 7 and 1 not in a for a in got)  # both cases happen


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny v1.1 checkpoint written by transformers, with the demo's spiece.model beside it."""
    import transformers
    torch.manual_seed(1)
    config = transformers.T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration(config)
    head = torch.randn(512, 64)
    head[1] *= 40 / head[1].norm()  # a strong EOS row: some answers end before --max-new-tokens
    hf.lm_head.weight = torch.nn.Parameter(head)
    path = str(tmp_path_factory.mktemp("hf") / "t5")
    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["tie_word_embeddings"] = False  # transformers 5 writes True even for an own lm_head; the hub's v1.1 says False
    cfg.pop("scale_decoder_outputs", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    shutil.copy(os.path.join(demo_data.demo_dir(), "spiece.model"), path)
    return path


def hf_model(path):
    import transformers
    return transformers.T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def test_cli_backbone_answers_equal_transformers_generate(hf_dir, capsys):
    """--model DIR (the backbone alone) answers each prompt with transformers' greedy generate ids and text."""
    results = generate.main(["--model", hf_dir, *CPU, "--max-new-tokens", "8", *PROMPTS])
    hf, tok = hf_model(hf_dir), vocab()
    for r, prompt in zip(results, PROMPTS):
        want = hf.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=8, do_sample=False,
                           num_beams=1)[0, 1:].tolist()
        assert r["tokens"] == want and r["answer"] == generate.text(tok, want)
    assert any(r["tokens"][-1] == 1 for r in results)
    printed = capsys.readouterr().out
    assert printed.count("prompt: ") == 3 and f"answer: {results[0]['answer']}" in printed


def test_cli_choices_scores_equal_transformers_loss_and_score_choices(hf_dir, capsys):
    """--choices prints each answer's summed log-prob (EOS included): -(HF mean loss x tokens), = score_choices."""
    results = generate.main(["--model", hf_dir, *CPU, "--choices", "yes, no,four", PROMPTS[1]])
    hf, tok = hf_model(hf_dir), vocab()
    ids = tok.encode(PROMPTS[1])
    targets = [tok.encode(c) + [1] for c in ("yes", "no", "four")]
    with torch.no_grad():
        want = [-hf(input_ids=torch.tensor([ids]), labels=torch.tensor([t])).loss.item() * len(t) for t in targets]
    got = list(results[0]["scores"].values())
    assert list(results[0]["scores"]) == ["yes", "no", "four"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ours = t5_weights.load(hf_dir)
    np.testing.assert_allclose(got, evaluate.score_choices(ours, [ids], [targets])[0], rtol=1e-6, atol=1e-6)
    assert results[0]["answer"] == ["yes", "no", "four"][int(np.argmax(want))]
    assert f"answer: {results[0]['answer']}" in capsys.readouterr().out


def brute_force_routing(model, site, prompt_ids, answer):
    """Mean over heads and tokens of `site`'s recorded probabilities in one unpadded forward of prompt + answer:
    encoder sites and cross-attention K/V over the prompt's tokens, other decoder sites over the answer's."""
    with torch.no_grad(), routing.record(model, [site]) as seen:
        model(torch.tensor([prompt_ids]), torch.tensor([[0] + answer[:-1]]))
    probs = seen[site][0].double()  # [len, (H,) E]
    return (probs.mean(1) if probs.dim() == 3 else probs).mean(0).numpy()


def test_cli_routing_rows_equal_brute_force_mean(tmp_path, capsys):
    """--routing-sites all: each row (the sites of one kind pooled) sums to 1 and equals the brute-force mean over
    the recorded probabilities of that kind's sites; the default site is the last decoder FFN."""
    from safetensors.torch import save_file
    settings = ModelSettings(method="mov", experts=4, model="tiny", dropout=0.0)
    model = build.build_model(settings, torch.device("cpu")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(tmp_path / "adapter.safetensors"))
    flags = ["--model", "tiny", "--adapter", str(tmp_path / "adapter.safetensors"), "--experts", "4", *CPU,
             "--max-new-tokens", "5", "--routing"]
    results = generate.main(flags + ["--routing-sites", "all"] + PROMPTS[:2])
    tok = vocab()
    for r, prompt in zip(results, PROMPTS):
        ids = tok.encode(prompt)
        assert r["tokens"] == generate.greedy(model, [ids], max_new_tokens=5)[0]
        assert set(r["routing"]) == {f"{s} (blocks 0-1)" for s in (
            "encoder self-attn k", "encoder self-attn v", "encoder ffn", "decoder self-attn k",
            "decoder self-attn v", "decoder cross-attn k", "decoder cross-attn v", "decoder ffn")}
        for label, row in r["routing"].items():
            kind = label.split(" (")[0]
            sites = [n for n in mov_sites(model) if generate.site_kind(n)[0] == kind]
            want = np.mean([brute_force_routing(model, s, ids, r["tokens"]) for s in sites], axis=0)
            np.testing.assert_allclose(row, want, atol=1e-6)
            assert sum(row) == pytest.approx(1.0, abs=1e-5)
    printed = capsys.readouterr().out
    assert "routing, % per expert" in printed and "decoder cross-attn k (blocks 0-1)" in printed
    default = generate.main(flags + [PROMPTS[0]])[0]["routing"]
    assert list(default) == ["decoder ffn (block 1)"]
    np.testing.assert_allclose(default["decoder ffn (block 1)"], brute_force_routing(
        model, "decoder.block.1.layer.2.DenseReluDense.act", tok.encode(PROMPTS[0]), results[0]["tokens"]),
        atol=1e-6)


def mov_sites(model):
    return [n for n, m in model.named_modules() if getattr(m, "num_experts", None) is not None]


def test_input_file_writes_one_json_line_per_prompt(tmp_path, capsys):
    """--input-file: one JSON line (prompt, answer, tokens) per line of the file, in order."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    results = generate.main(["--model", "tiny", *CPU, "--max-new-tokens", "3", "--input-file",
                             str(tmp_path / "prompts.txt")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == PROMPTS and lines == results
    assert all(set(x) == {"prompt", "answer", "tokens"} for x in lines)


def test_show_demo_answers_prints_held_out_prompts_and_expected(capsys):
    """The demo's ending prints the first item of the first two held-out datasets, its greedy answer and the
    expected choice."""
    import data
    model = tiny_mov()
    generate.show_demo_answers(model, types.SimpleNamespace(input_length=128, out="runs/x"), torch.device("cpu"),
                               autocast=False)
    printed, tok = capsys.readouterr().out, vocab()
    items = [next(iter(ts.values()))[0] for ts in list(data.load_eval("demo", max_examples=1).values())[:2]]
    for it in items:
        answer = generate.greedy(model, [it["inputs"]], max_new_tokens=8)[0]
        assert f"{it['text']}\n    answer: {generate.text(tok, answer)!r}   expected: " \
               f"{tok.decode(it['choices'][it['label']])!r}" in printed


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_errors_are_one_line_without_traceback(tmp_path, hf_dir):
    """A missing vocabulary, a run directory without checkpoints, an empty prompt and no prompt: one `error:`
    line each, exit status 1."""
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    os.remove(bare / "spiece.model")
    run = tmp_path / "run"
    run.mkdir()
    settings = dict(method="mov", experts=4, rank=4, alpha=16.0, top_k=None, router_input="token", model="tiny",
                    seed=0, dropout=0.1, data="demo")
    (run / "config.json").write_text(json.dumps(settings))
    cases = [(["--model", str(bare), "hello"], ["no vocabulary found", str(bare / "spiece.model"), "--vocab"]),
             (["--run", str(run), "hello"], ["has no checkpoint yet", str(run)]),
             (["--model", "tiny", "  "], ["prompt 1 is empty"]),
             (["--model", "tiny"], ["no prompt"])]
    for args, needles in cases:
        proc = run_cli(*args, *CPU)
        assert proc.returncode == 1, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert all(n in lines[0] for n in needles), lines[0]


def test_greedy_sentence_routed_rows_use_their_own_embedding():
    """A sentence-routed MoV model: each batched row is decoded with its own embedding, as one prompt alone."""
    model = mov.add_mov(t5.T5(TINY), 3, router=lambda: routing.Router(mov.Router(), sentence_dim=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(2.0 * torch.randn_like(p))
    model.eval()
    inputs, emb = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], np.random.default_rng(0).normal(size=(3, 4)) * 5
    got = generate.greedy(model, inputs, max_new_tokens=5, batch_size=2, sentence_embeddings=emb.astype(np.float32))
    for x, e, answer in zip(inputs, emb, got):
        with routing.sentence_routing(model, torch.tensor(e[None], dtype=torch.float32)):
            row = model.generate(torch.tensor([x]), max_new_tokens=5)[0].tolist()
        assert answer == (row[:row.index(1) + 1] if 1 in row else row)
    swapped = generate.greedy(model, inputs, max_new_tokens=5, batch_size=2,
                              sentence_embeddings=emb[::-1].copy().astype(np.float32))
    assert swapped != got  # the embedding matters, so the check above can fail


def test_tiny_run_on_local_data_reads_the_data_vocabulary(tmp_path):
    """A run of the random tiny model on a local data directory: the vocabulary is that directory's spiece.model;
    without one there, and for the demo data, it is the demo's."""
    data_dir, run = tmp_path / "p3", tmp_path / "run"
    data_dir.mkdir()
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(model="tiny", data=str(data_dir))))
    args = types.SimpleNamespace(vocab=None, run=str(run), model="tiny")
    demo = os.path.join(demo_data.demo_dir(), "spiece.model")
    assert generate.vocab_file(args) == demo  # the directory has no vocabulary yet
    shutil.copy(demo, data_dir / "spiece.model")
    assert generate.vocab_file(args) == str(data_dir / "spiece.model")
    (run / "config.json").write_text(json.dumps(dict(model="tiny", data="demo")))
    assert generate.vocab_file(args) == demo
