"""evaluate.py: rank-classification scores against transformers, ties, the median/ANLI/average arithmetic, routing
statistics against a per-choice loop, and the command line on the offline demo data (tiny random T5)."""
import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from runner import build
import data
import evaluate
from runner import report
import mov
import routing
import t5
from conftest import tiny_t5
from test_data import write_config

TINY = t5.T5Config.preset("tiny")


tiny_model = tiny_t5


def hf_twin(model):
    """transformers' T5ForConditionalGeneration holding the same weights (untied head, no output rescale)."""
    import transformers
    c = model.config
    hc = transformers.T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                               num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
                               num_heads=c.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                               tie_word_embeddings=False, scale_decoder_outputs=False, decoder_start_token_id=0,
                               pad_token_id=0, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration(hc).eval()
    # transformers 5 ties the head to `shared` whatever the config says: give it its own tensor first
    hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.lm_head.weight))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    return hf


def toy_examples(seed=0):
    """Inputs of different lengths; 2 to 4 choices each, of 1 to 6 tokens ending in EOS (id 1)."""
    rng = np.random.default_rng(seed)
    inputs, choices = [], []
    for n_choices in (2, 4, 3, 2, 4):
        inputs.append(rng.integers(2, TINY.vocab_size, size=rng.integers(3, 12)).tolist())
        choices.append([rng.integers(2, TINY.vocab_size, size=rng.integers(0, 6)).tolist() + [1]
                        for _ in range(n_choices)])
    return inputs, choices


def test_score_choices_equals_transformers_loss():
    """Each choice's score is -(HF mean token loss x length) of an unpadded one-choice forward, any batch split."""
    model = tiny_model()
    hf = hf_twin(model)
    inputs, choices = toy_examples()
    expected = []
    with torch.no_grad():
        for inp, chs in zip(inputs, choices):
            expected.append([-hf(input_ids=torch.tensor([inp]), labels=torch.tensor([c])).loss.item() * len(c)
                             for c in chs])
    for batch_size, lengths in ((2, {}), (1, {}), (5, {}), (3, {"input_length": 16, "target_length": 9})):
        got = evaluate.score_choices(model, inputs, choices, batch_size=batch_size, **lengths)
        assert [len(g) for g in got] == [len(c) for c in choices]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-3)


def test_score_choices_sentence_routing_matches_per_example_loop():
    """With sentence routing, each example (and each of its choices) routes by its own embedding."""
    model = mov.add_mov(tiny_model(), 3, router=lambda: routing.Router(mov.Router(), sentence_dim=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)  # experts away from ones, so routing changes the output
    inputs, choices = toy_examples(1)
    emb = torch.randn(len(inputs), 5)
    got = evaluate.score_choices(model, inputs, choices, batch_size=2, sentence_embeddings=emb.numpy())
    with torch.no_grad():
        for i, (inp, chs) in enumerate(zip(inputs, choices)):
            for j, c in enumerate(chs):
                with routing.sentence_routing(model, emb[i:i + 1]):
                    logits = model(torch.tensor([inp]), torch.tensor([[0] + c[:-1]]))[0]
                want = logits.log_softmax(-1)[torch.arange(len(c)), torch.tensor(c)].sum().item()
                assert got[i][j] == pytest.approx(want, rel=1e-5, abs=1e-3)


def test_ties_go_to_the_first_choice():
    """predict returns the first of equal maxima (as np.argmax and torch.argmax document)."""
    assert evaluate.predict(np.array([-2.0, -1.0, -1.0])) == 1
    assert evaluate.predict(np.array([-3.0, -3.0])) == 0
    assert int(torch.argmax(torch.tensor([0.5, 2.0, 2.0, 2.0]))) == 1


def test_summarize_median_anli_and_average():
    """Medians per dataset (even counts: mean of the middle two), ANLI = mean of rounds, 8-column mean, by hand."""
    acc = {"anli_r1": {"a": 40, "b": 30, "c": 35}, "anli_r2": {"a": 30, "b": 34}, "anli_r3": {"a": 33},
           "cb": {"a": 50, "b": 60, "c": 70, "d": 10}, "rte": {"a": 60}, "wsc": {"a": 40, "b": 60, "c": 50},
           "wic": {"a": 50}, "copa": {"a": 90, "b": 70, "c": 80}, "winogrande": {"a": 52}, "hellaswag": {"a": 30}}
    s = report.summarize(acc)
    assert s["datasets"] == {"anli_r1": 35, "anli_r2": 32, "anli_r3": 33, "cb": 55, "rte": 60, "wsc": 50,
                             "wic": 50, "copa": 80, "winogrande": 52, "hellaswag": 30}
    assert s["columns"]["anli"] == pytest.approx(100 / 3)
    assert sorted(s["average_over"]) == sorted(report.PAPER_DATASETS)
    assert s["average"] == pytest.approx((100 / 3 + 55 + 60 + 50 + 50 + 80 + 52 + 30) / 8)


def test_format_table_has_papers_columns_and_row():
    """The table lists Table 1's columns in order and, with compare='paper', the same method's paper average."""
    acc = {k: {"t": 50.0} for k in report.HELD_OUT}
    results = {**report.summarize(acc), "meta": {"method": "mov", "experts": 10, "label": "mov-10"}}
    text = report.format_table(results, compare="paper")
    header = text.splitlines()[0]
    names = ["ANLI R1", "ANLI R2", "ANLI R3", "ANLI", "CB", "RTE", "WSC", "WiC", "COPA", "WinoGrande", "HellaSwag", "Avg"]
    assert [c.strip() for c in header.strip("|").split("|")][1:] == names
    assert "| paper: MoV-10 |" in text and "59.93" in text and "| mov-10 | 50.00" in text
    assert "MoLORA-15" not in text
    with pytest.raises(ValueError, match="compare"):
        report.format_table(results, compare="T5-11B")


def brute_force_routing(model, site, inputs, choices):
    """Token-weighted mean routing at a decoder site over every choice token, one unpadded forward per choice."""
    total, tokens = 0.0, 0
    with torch.no_grad(), routing.record(model, [site]) as seen:
        for inp, chs in zip(inputs, choices):
            for c in chs:
                model(torch.tensor([inp]), torch.tensor([[0] + c[:-1]]))
                total = total + seen[site][0].double().sum(0).numpy()
                tokens += len(c)
    return total / tokens


def test_routing_statistics_equal_per_choice_loop():
    """score_and_route's decoder-FFN routing (padding and dummy choices masked) equals an unpadded loop."""
    model = mov.add_mov(tiny_model(), 4).eval()
    inputs, choices = toy_examples(2)
    site = "decoder.block.1.layer.2.DenseReluDense.act"
    _, routed = evaluate.score_and_route(model, inputs, choices, batch_size=2, input_length=16, target_length=8,
                                         routing_sites=(site,))
    sums, counts = routed[site]
    assert counts.tolist() == [sum(len(c) for c in chs) for chs in choices]
    np.testing.assert_allclose(sums.sum(0) / counts.sum(), brute_force_routing(model, site, inputs, choices),
                               rtol=1e-5)
    assert not model.get_submodule(site).router._forward_hooks  # the recording hook is removed
    with pytest.raises(ValueError, match="not a routed"):
        evaluate.score_and_route(model, inputs, choices, routing_sites=("decoder.block.1.layer.2",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_choices_cuda_matches_cpu():
    """On CUDA, scores equal the CPU ones (fp32)."""
    model = tiny_model()
    inputs, choices = toy_examples()
    cpu = evaluate.score_choices(model, inputs, choices, batch_size=2)
    gpu = evaluate.score_choices(model.cuda(), inputs, choices, batch_size=2, device="cuda")
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------------------------- command line
def demo_items(max_examples):
    import data
    return data.load_eval("demo", max_examples=max_examples)


def brute_force_accuracy(model, items):
    """Accuracy (%) of argmax over choices of -(HF loss x length), one unpadded forward per choice."""
    hf = hf_twin(model)
    right = 0
    with torch.no_grad():
        for it in items:
            s = [-hf(input_ids=torch.tensor([it["inputs"]]), labels=torch.tensor([c])).loss.item() * len(c)
                 for c in it["choices"]]
            right += int(np.argmax(s) == it["label"])
    return 100.0 * right / len(items)


def test_cli_on_demo_writes_table_json_md(tmp_path, capsys):
    """`--model tiny --data demo` prints the table and writes eval-max4.json/md (a --max-examples run) whose accuracies match a HF loop."""
    import train
    results = evaluate.main(["--model", "tiny", "--data", "demo", "--max-examples", "4", "--batch-size", "3",
                             "--device", "cpu", "--out", str(tmp_path), "--compare", "paper"])
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "Avg" in printed and "paper: T0-3B" in printed
    saved = json.loads((tmp_path / "eval-max4.json").read_text())
    md = (tmp_path / "eval-max4.md").read_text()
    model = build.build_model(train.Config(method="full", model="tiny", seed=0, dropout=0.0), torch.device("cpu"))
    medians = []
    for dataset, templates in demo_items(4).items():
        accs = []
        for template, items in templates.items():
            acc = brute_force_accuracy(model.eval(), items)
            assert saved["tasks"][dataset][template]["accuracy"] == pytest.approx(acc)
            assert f"| {dataset} | {template} | 4 |" in md
            accs.append(acc)
        medians.append(np.median(accs))
    assert saved["average"] == pytest.approx(np.mean(medians)) == pytest.approx(results["average"])


def test_cli_routing_on_mov_adapter_writes_csv_and_png(tmp_path):
    """--routing on a MoV adapter writes routing.png and routing.csv whose rows equal an unpadded per-choice loop."""
    import train
    from safetensors.torch import load_file, save_file
    model = build.build_model(train.Config(method="mov", experts=4, model="tiny", seed=0, dropout=0.0),
                              torch.device("cpu"))
    trained = {n: (p.detach() + 0.3 * torch.randn_like(p)).contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(tmp_path / "adapter.safetensors"))
    evaluate.main(["--model", "tiny", "--adapter", str(tmp_path / "adapter.safetensors"), "--method", "mov",
                   "--experts", "4", "--data", "demo", "--max-examples", "3", "--batch-size", "2", "--device", "cpu",
                   "--out", str(tmp_path / "out"), "--routing"])
    assert (tmp_path / "out" / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "out" / "routing.csv") as f:
        rows = list(csv.DictReader(f))
    site = "decoder.block.1.layer.2.DenseReluDense.act"
    model.load_state_dict(load_file(str(tmp_path / "adapter.safetensors")), strict=False)
    model.eval()
    sets = demo_items(3)
    for dataset, templates in sets.items():
        for template, items in templates.items():
            row = next(r for r in rows if r["dataset"] == dataset and r["template"] == template)
            assert row["site"] == site
            assert int(row["tokens"]) == sum(len(c) for it in items for c in it["choices"])
            want = brute_force_routing(model, site, [it["inputs"] for it in items], [it["choices"] for it in items])
            np.testing.assert_allclose([float(row[f"expert_{e}"]) for e in range(4)], want, atol=2e-6)
    assert {r["dataset"] for r in rows if r["template"] == "*"} == set(sets)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    """Unknown flags, a missing run directory, a run without checkpoints and an unknown dataset are clear errors."""
    import train
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "tiny", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no such directory"):
        evaluate.main(["--run", str(tmp_path / "nowhere")])
    (tmp_path / "config.json").write_text(json.dumps(train.Config(model="tiny", data="demo").__dict__))
    with pytest.raises(ValueError, match="has no checkpoint"):
        evaluate.main(["--run", str(tmp_path), "--device", "cpu"])
    os.makedirs(tmp_path / "checkpoints" / "step_00000003")
    with pytest.raises(ValueError, match="no checkpoint of step 7"):
        evaluate.main(["--run", str(tmp_path), "--step", "7", "--device", "cpu"])
    with pytest.raises(ValueError, match="demo_nothing"):
        evaluate.main(["--model", "tiny", "--data", "demo", "--datasets", "demo_nothing", "--device", "cpu",
                       "--out", str(tmp_path / "out")])


def test_help_lists_every_flag_with_its_default(capsys):
    """--help documents each option and shows its default."""
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--run", "--model", "--adapter", "--data", "--max-examples", "--batch-size", "--device", "--dtype",
                 "--compare", "--routing", "--routing-sites", "--out"):
        assert flag in text
    assert "(default: 16)" in text.replace("\n", " ").replace("  ", " ") or "default: 16" in text


def test_cli_run_uses_newest_checkpoint_and_run_data(tmp_path, capsys):
    """--run loads the newest checkpoint (= --adapter of its file), reads the run's data, writes into the run dir."""
    import train
    from safetensors.torch import save_file
    cfg = train.Config(method="mov", experts=10, model="tiny", data="demo", dropout=0.0, out=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg.__dict__))
    model = build.build_model(cfg, torch.device("cpu"))
    for step, noise in ((3, 0.0), (5, 0.5)):
        os.makedirs(tmp_path / "checkpoints" / f"step_{step:08d}")
        save_file({n: (p.detach() + noise * torch.randn_like(p)).contiguous()
                   for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp_path / "checkpoints" / f"step_{step:08d}" / "trainable.safetensors"))
    run = evaluate.main(["--run", str(tmp_path), "--max-examples", "3", "--device", "cpu", "--compare", "paper"])
    assert "| mov-10 step 5 |" in capsys.readouterr().out
    # a --max-examples run writes eval-max3.json: it never overwrites a full evaluation's eval.json
    assert json.loads((tmp_path / "eval-max3.json").read_text())["meta"]["data"] == "demo"
    assert not (tmp_path / "eval.json").exists()
    newest = evaluate.main(["--model", "tiny", "--adapter", str(tmp_path / "checkpoints" / "step_00000005"),
                            "--data", "demo", "--max-examples", "3", "--device", "cpu", "--out", str(tmp_path / "a")])
    assert run["tasks"] == newest["tasks"]


def test_evaluate_sentence_routed_model_embeds_item_texts():
    """A sentence-routed model gets sentence_embedder(texts) of each template's items, in order, and scores them."""
    sets = demo_items(2)
    model = mov.add_mov(tiny_model(), 2, router=lambda: routing.Router(mov.Router(), sentence_dim=3)).eval()
    seen = []

    def embedder(texts):
        seen.extend(texts)
        return np.array([[len(t), t.count(" "), 1.0] for t in texts], np.float32)
    results = evaluate.evaluate(model, sets, batch_size=2, sentence_embedder=embedder, progress=False)
    assert seen == [it["text"] for ts in sets.values() for items in ts.values() for it in items]
    assert set(results["datasets"]) == set(sets)


XLA_SCRIPT = textwrap.dedent('''
    import json
    import numpy as np
    import torch, torch_xla
    import torch_xla.debug.metrics as met
    import evaluate, mov, t5

    torch.manual_seed(0)
    model = mov.add_mov(t5.T5(t5.T5Config.preset("tiny")), 3).eval()
    rng = np.random.default_rng(0)

    def examples():
        inputs = [rng.integers(2, 512, size=rng.integers(3, 12)).tolist() for _ in range(5)]
        choices = [[rng.integers(2, 512, size=rng.integers(0, 6)).tolist() + [1] for _ in range(k)]
                   for k in (2, 3, 2, 3, 1)]
        return inputs, choices

    site = "decoder.block.1.layer.2.DenseReluDense.act"
    a, b = examples(), examples()
    shapes = dict(batch_size=2, input_length=16, target_length=8, routing_sites=(site,))
    cpu = [evaluate.score_and_route(model, *x, **shapes) for x in (a, b)]
    model.to(torch_xla.device())
    compiles = []
    xla = []
    for x in (a, b):
        xla.append(evaluate.score_and_route(model, *x, **shapes))  # two calls, three batches each, one shape
        compiles.append(met.counter_value("UncachedCompile"))
    diff = max(float(np.abs(s1 - s2).max()) for (c, x) in zip(cpu, xla) for s1, s2 in zip(c[0], x[0]))
    rdiff = max(float(np.abs(c[1][site][0] - x[1][site][0]).max()) for c, x in zip(cpu, xla))
    print(json.dumps(dict(compiles=compiles, fallbacks=met.executed_fallback_ops(),
                          scalar_reads=[n for n in met.counter_names() if "local_scalar" in n],
                          max_diff=diff, routing_diff=rdiff)))
''')


@pytest.mark.xla
@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="torch-xla is not installed (no wheel here)")
def test_score_choices_on_xla_compiles_once_without_host_reads():
    """On an XLA device: scores and routing equal CPU's, one compile for all batches of two calls, no .item()."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo)
    # own process: the SPMD tests of the xla run must switch SPMD on before any XLA tensor of theirs exists
    done = subprocess.run([sys.executable, "-c", XLA_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["compiles"][0] >= 1 and result["compiles"][1] == result["compiles"][0], result
    assert result["fallbacks"] == [] and result["scalar_reads"] == [], result
    assert result["max_diff"] < 1e-3 and result["routing_diff"] < 1e-5, result


# ----------------------------------------------------------------------------------------------- no correct choice
def test_item_without_correct_choice_counts_wrong(tmp_path):
    """An eval example with no choice marked is_correct loads with label None (no error), counts as wrong in the
    accuracy (a brute-force count over the scores), and the results / eval.md report how many there were."""
    rng = random.Random(0)
    rows = []
    for example in range(4):
        inputs = [rng.randrange(3, 100) for _ in range(5)]
        for choice in range(2):
            correct = example != 1 and choice == example % 2  # example 1: no correct choice
            rows.append({"idx": [example, choice], "inputs": inputs, "targets": [10 + choice, 1],
                         "is_correct": correct, "weight": 1.0})
    config = "super_glue_rte_does_this_imply_score_eval"
    write_config(str(tmp_path / "p3"), config, "validation", rows)
    with pytest.warns(UserWarning, match="left out"):
        sets = data.load_eval(str(tmp_path / "p3"), datasets=["rte"])
    items = sets["rte"][config]
    assert [it["label"] for it in items] == [0, None, 0, 1]
    model = tiny_model()
    results = evaluate.evaluate(model, sets, input_length=16, target_length=8, device=torch.device("cpu"),
                                out_dir=str(tmp_path / "out"), progress=False)
    with torch.no_grad():  # brute force: one unpadded forward per choice, its summed token log-probabilities
        scores = [[model(torch.tensor([it["inputs"]]), torch.tensor([[0] + c[:-1]]))[0].log_softmax(-1)
                   [torch.arange(len(c)), torch.tensor(c)].sum().item() for c in it["choices"]] for it in items]
    right = sum(it["label"] is not None and int(np.argmax(s)) == it["label"] for s, it in zip(scores, items))
    task = results["tasks"]["rte"][config]
    assert task["no_correct"] == 1 and task["accuracy"] == pytest.approx(100.0 * right / 4)
    assert "1 examples have no choice marked is_correct" in (tmp_path / "out" / "eval.md").read_text()
