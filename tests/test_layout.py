"""The layout's promises: no import circles between root files, mov.py / molora.py usable alone, adapters stack."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import molora
import mov

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def root_imports(module):
    """The root modules `module` imports anywhere in its file (top level or inside functions)."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(ROOT_MODULES) - {module}


def test_root_files_import_no_circle():
    """The import graph of the root .py files (function-level imports included) has no cycle."""
    graph = {m: root_imports(m) for m in ROOT_MODULES}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for m in ROOT_MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import circles: {[' -> '.join(c) for c in cycles]}"


@pytest.mark.parametrize("module", ["mov", "molora", "t5"])
def test_layer_and_model_files_import_torch_alone(module):
    """mov.py, molora.py and t5.py import no other root file at module level (t5 loads weights lazily)."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"torch", "contextlib", "dataclasses", "json", "math", "os"}, top


def test_root_files_are_at_most_about_400_lines():
    """Every root .py file holds at most about 400 lines (one sitting)."""
    long = {}
    for m in ROOT_MODULES:
        with open(os.path.join(ROOT, m + ".py")) as f:
            n = sum(1 for _ in f)
        if n > 410:
            long[m] = n
    assert not long, long


COPIED_USE = textwrap.dedent("""
    import sys, torch, transformers
    import {module} as adapter
    assert not any(name in sys.modules for name in ("t5", "train", "build", "molora" if "{module}" == "mov"
                                                     else "mov")), "the copy imported a project file"
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    before = {{n for n, _ in model.named_parameters()}}
    {inject}
    params = dict(model.named_parameters())
    new = set(params) - before
    assert new and {{n for n in params if adapter.is_adapter_param(n)}} == new, sorted(new)[:4]
    assert {{n for n, p in params.items() if p.requires_grad}} == new
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 64, (2, 7))
    start = {{n: p.detach().clone() for n, p in params.items()}}
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {{n for n, p in params.items() if not torch.equal(p, start[n])}}
    assert changed and changed <= new, sorted(changed - new)[:4]
    print("ok", len(new))
""")


@pytest.mark.parametrize("module, inject", [
    ("mov", "adapter.add_mov(model, num_experts=3, ffn_targets=('DenseReluDense.act',))"),
    ("molora", "adapter.add_molora(model, num_experts=3)"),
])
def test_file_copied_alone_trains_a_transformers_t5(tmp_path, module, inject):
    """mov.py / molora.py copied alone into an empty directory adapt and train transformers' T5 from there."""
    (tmp_path / f"{module}.py").write_text(open(os.path.join(ROOT, f"{module}.py")).read())
    (tmp_path / "run.py").write_text(COPIED_USE.format(module=module, inject=inject))
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


def tiny_t5():
    import t5
    torch.manual_seed(0)
    return t5.T5(t5.T5Config.preset("tiny"))


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
    """routing.default_sites names the last decoder FFN's routed layer: `act` for MoV, `wi_0` for MoLORA; an
    (IA)3 layer (no router) is refused as a routing site before any forward."""
    import routing
    for inject, leaf in ((lambda m: mov.add_mov(m, 3), "act"), (lambda m: molora.add_molora(m, 3), "wi_0")):
        model = inject(tiny_t5())
        (site,) = routing.default_sites(model)
        assert site.endswith(f"layer.2.DenseReluDense.{leaf}")
        assert routing.routed_layers(model, (site,))[site].num_experts == 3
    ia3 = mov.add_ia3(tiny_t5())
    with pytest.raises(ValueError, match="not a routed"):
        routing.routed_layers(ia3, routing.default_sites(ia3))


def test_resume_identity_compares_only_the_settings_a_method_uses(tmp_path):
    """check_same_run refuses another --experts for mov but not for ia3 (which has no experts), and another
    --rank for lora but not for mov."""
    import json
    import rundir
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
