"""The layout's promises: the method at the root, the machinery one level down, no import circle and no chain
deeper than 6 files, mov.py / molora.py short and torch-only, usable copied alone (with routing.py for the
options), and adapters that stack."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import molora
import mov
from conftest import tiny_t5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("sources", "runner", "tools", "miniature")  # the project's packages one level down
# The method (the six files the project is known by, the optimizer, the sharding, the router options) and the
# scripts a user runs.
ROOT_FILES = {"t5", "mov", "molora", "routing", "adafactor", "sharding", "data", "train", "evaluate", "generate",
              "bench"}


def project_modules():
    """{dotted module name: file path} of every .py file of the project outside tests/ (packages' __init__ as
    the package's name)."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for folder in FOLDERS:
        for f in os.listdir(os.path.join(ROOT, folder)) if os.path.isdir(os.path.join(ROOT, folder)) else []:
            if f.endswith(".py"):
                found[folder if f == "__init__.py" else f"{folder}.{f[:-3]}"] = os.path.join(ROOT, folder, f)
    return found


def imports(path, modules):
    """The project modules a file imports anywhere (top level or inside functions), resolved to `modules`'s names:
    `from runner import build` is runner.build (and the package runner, whose __init__ runs first)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                names |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            names |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names & set(modules)


def graph():
    modules = project_modules()
    return {m: imports(path, modules) - {m} for m, path in modules.items()}


def test_root_holds_the_method_and_the_scripts():
    """The root's .py files are the method and the scripts a user runs (at most 12); the rest is one level down."""
    root = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert root == ROOT_FILES and len(root) <= 12, sorted(root ^ ROOT_FILES)


def test_project_imports_no_circle():
    """The import graph of the project's files (function-level imports included) has no cycle."""
    g, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for m in g:
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import circles: {[' -> '.join(c) for c in cycles]}"


def test_no_import_chain_deeper_than_six_files():
    """The longest chain of project files importing one another holds at most 6 files."""
    g, depth = graph(), {}

    def chain(m, seen=()):
        if m not in depth:
            depth[m] = [m] + max((chain(n, seen + (m,)) for n in g[m] if n not in seen), key=len, default=[])
        return depth[m]
    longest = max((chain(m) for m in g), key=len)
    assert len(longest) <= 6, " -> ".join(longest)


@pytest.mark.parametrize("module, most", [("mov", 250), ("molora", 180)])
def test_layer_files_are_short_and_import_only_torch(module, most):
    """mov.py (at most 250 lines) and molora.py (at most 180) import torch and the standard library only."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        text = f.read()
    tree = ast.parse(text)
    top = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"torch", "contextlib"}, top
    assert text.count("\n") <= most


@pytest.mark.parametrize("module", ["t5", "routing"])
def test_model_and_routing_files_import_only_torch(module):
    """t5.py and routing.py import torch and the standard library only, anywhere in the file."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    top = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"torch", "contextlib", "dataclasses", "math", "re", "sys"}, top


COPIED_USE = textwrap.dedent("""
    import contextlib, sys, torch, transformers
    import {module} as adapter
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.randint(2, 64, (2, 7))
    context = contextlib.nullcontext  # what each forward runs inside (sentence routing sets it)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).logits
    before = {{n for n, _ in model.named_parameters()}}
    {inject}
    assert not any(name in sys.modules for name in ("t5", "train", "runner", "sources", "data",
                                                     "molora" if "{module}" == "mov" else "mov")), "a project file"
    params = dict(model.named_parameters())
    new = set(params) - before
    assert new and {{n for n in params if adapter.is_adapter_param(n)}} == new, sorted(new)[:4]
    assert {{n for n, p in params.items() if p.requires_grad}} == new
    with torch.no_grad(), context():
        torch.testing.assert_close(model(input_ids=ids, labels=ids).logits, reference)  # unchanged at init
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = {{n: p.detach().clone() for n, p in params.items()}}
    for _ in range(3):
        with context():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert {{n for n, p in params.items() if p.grad is not None}} <= new
        optimizer.step()
        optimizer.zero_grad()
    changed = {{n for n, p in params.items() if not torch.equal(p, start[n])}}
    assert changed and changed <= new, sorted(changed - new)[:4]
    print("ok", len(new))
""")


OPTIONS = ("import routing; options = lambda: routing.Router(adapter.Router(), jitter=0.1, bias=True)\n"
           "{call}\n"
           "assert any(n.endswith('_router_bias') for n, _ in model.named_parameters())")
SENTENCE = ("import routing\n"
            "{call}\n"
            "context = lambda: routing.sentence_routing(model, torch.randn(2, 5))")


@pytest.mark.slow
@pytest.mark.parametrize("module, inject, copied", [
    ("mov", "adapter.add_mov(model, num_experts=3, ffn_targets=('DenseReluDense.act',))", ()),
    ("molora", "adapter.add_molora(model, num_experts=3)", ()),
    ("mov", OPTIONS.format(call="adapter.add_mov(model, 3, router=options, ffn_targets=('DenseReluDense.act',))"),
     ("routing",)),
    ("molora", OPTIONS.format(call="adapter.add_molora(model, 3, router=options)"), ("routing",)),
    ("mov", SENTENCE.format(call="adapter.add_mov(model, 3, router=lambda: routing.Router(adapter.Router(), "
                                 "sentence_dim=5),"
                                 " ffn_targets=('DenseReluDense.act',))"), ("routing",)),
])
def test_file_copied_alone_trains_a_transformers_t5(tmp_path, module, inject, copied):
    """mov.py / molora.py copied alone into an empty directory adapt and train transformers' T5, unchanged at init
    and with gradients only in adapter parameters; with routing.py beside them they take the original's jitter,
    router bias and sentence routing."""
    for name in (module, *copied):
        (tmp_path / f"{name}.py").write_text(open(os.path.join(ROOT, f"{name}.py")).read())
    (tmp_path / "run.py").write_text(COPIED_USE.format(module=module, inject=inject))
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize("order", ["mov then lora", "lora then mov"])
def test_stacked_adapters_all_train_and_the_base_stays_frozen(order):
    """add_mov then add_lora (and the reverse): every adapter parameter is trainable, every base weight frozen,
    and one optimizer step changes adapter parameters of both kinds."""
    model = tiny_t5()
    base = {n for n, _ in model.named_parameters()}
    steps = [lambda m: mov.add_mov(m, 3), lambda m: molora.add_lora(m, rank=2)]
    for inject in steps if order == "mov then lora" else steps[::-1]:
        inject(model)
    params = dict(model.named_parameters())
    ours = {n for n in params if mov.is_adapter_param(n) or molora.is_adapter_param(n)}
    assert any(mov.is_adapter_param(n) for n in ours) and any(molora.is_adapter_param(n) for n in ours)
    assert {n for n, p in params.items() if p.requires_grad} == ours
    # the base weights are the same tensors (now reached through a wrapper when adapters stack), all frozen
    assert len(params) - len(ours) == len(base)
    ids = torch.randint(2, 500, (2, 6))
    # B = 0 at init gives lora_A no gradient: one step on lora_B and MoV first, then all have gradients
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(ids, ids).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    model(ids, ids).float().logsumexp(-1).mean().backward()
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in ours
               if not n.endswith("lora_router")), [n for n in ours if params[n].grad is None][:3]


def test_freeze_base_leaves_other_adapters_alone():
    """freeze_base=False leaves every parameter as it was; freeze_base(model) freezes only unclaimed ones."""
    model = tiny_t5()
    mov.add_mov(model, 2, freeze_base=False)
    assert all(p.requires_grad for p in model.parameters())
    molora.freeze_base(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if mov.is_adapter_param(n)}


def test_default_routing_site_is_the_routed_ffn_layer_of_each_method():
    """routing.default_sites names the last decoder FFN's routed layer: `act` for MoV, `wi_0` for MoLORA; a model
    without routers ((IA)3) is refused as such before any forward, a wrong site of a routed model by name."""
    import routing
    for inject, leaf in ((lambda m: mov.add_mov(m, 3), "act"), (lambda m: molora.add_molora(m, 3), "wi_0")):
        model = inject(tiny_t5())
        (site,) = routing.default_sites(model)
        assert site.endswith(f"layer.2.DenseReluDense.{leaf}")
        assert routing.routed_layers(model, (site,))[site].num_experts == 3
    ia3 = mov.add_ia3(tiny_t5())
    with pytest.raises(ValueError, match="no routed layers .*needs a mov or molora model"):
        routing.routed_layers(ia3, routing.default_sites(ia3))
    with pytest.raises(ValueError, match="not a routed MoV/MoLORA layer"):
        routing.routed_layers(model, ("decoder.block.0",))


def test_resume_identity_compares_only_the_settings_a_method_uses(tmp_path):
    """check_same_run refuses another --experts for mov but not for ia3 (which has no experts), and another
    --rank for lora but not for mov."""
    import json
    from runner import rundir
    base = dict(method="ia3", model="tiny", experts=10, rank=4, alpha=16.0, top_k=None, router_input="token",
                router_bias=False)
    for method, changed, refused in (("ia3", {"experts": 30}, False), ("mov", {"experts": 30}, True),
                                     ("mov", {"rank": 8}, False), ("lora", {"rank": 8}, True)):
        run = tmp_path / f"{method}-{'-'.join(changed)}-{refused}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({**base, "method": method}))
        asked = {**base, "method": method, **changed}
        if refused:
            with pytest.raises(ValueError, match="holds another run"):
                rundir.check_same_run(asked, str(run))
        else:
            rundir.check_same_run(asked, str(run))
