"""The miniature's settings in one place: world, corpus, backbone, tasks, recipes, sweep; and their hash.

Two sizes: "full" (the experiment) and "smoke" (a tiny world, a few pretraining steps, two training steps per
method: the whole chain in about a minute, tests/test_miniature.py). The hash of these settings and of the source
of every file that makes data or models (world, corpus, spans, pretrain, templates, tasks) names the cache
directory and is written into every run, so the final table says exactly which world, tasks and recipes made it.
"""
import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

FULL = {
    "world": {"seed": 0, "per_kind": 6, "people": 20},
    "vocab": {"vocab_size": 1024, "docs": 6000},
    # revision 1 (README): 1,400 steps (span corruption to step 840) left the probe at 0.37; the same run continued
    # to 2,400 steps (span corruption still to 840, then prefix LM) with the rate decayed over the last quarter
    "backbone": {"size": {"d_model": 256, "d_ff": 640, "layers": 4, "heads": 4, "d_kv": 64}, "steps": 2400,
                 "batch_size": 32, "span_fraction": 0.35, "lr": 1e-2, "decay_fraction": 0.25, "input_length": 128,
                 "target_length": 32,
                 "lm_input": 80, "lm_target": 64, "seed": 0},
}
SMOKE = {
    "world": {"seed": 0, "per_kind": 6, "people": 20},
    "vocab": {"vocab_size": 400, "docs": 500},
    "backbone": {"size": {"d_model": 32, "d_ff": 64, "layers": 1, "heads": 2, "d_kv": 16}, "steps": 4,
                 "batch_size": 4, "span_fraction": 0.5, "lr": 1e-2, "input_length": 64, "target_length": 16,
                 "lm_input": 32, "lm_target": 32, "seed": 0},
}
BACKBONE_FILES = ("world.py", "corpus.py", "spans.py", "pretrain.py", "templates.py")
TASK_FILES = BACKBONE_FILES + ("tasks.py", "p3_layout.py", "checks.py")

# the tasks: examples per training template, per held-in validation template, per held-out template (dev, test)
FULL["tasks"] = {"train": 2000, "val": 20, "dev": 100, "test": 120, "seed": 1}
SMOKE["tasks"] = {"train": 20, "val": 4, "dev": 4, "test": 6, "seed": 1}
# the recipe of every run (train.py flags): packed rows of 256 / 64 tokens, Adafactor at a constant lr, dropout 0.1,
# a checkpoint every `save_every` steps; the held-in validation picks the step (early stopping)
FULL["recipe"] = {"steps": 180, "save_every": 60, "batch_size": 8, "input_length": 256, "target_length": 64,
                  "sentence_batch_size": 24, "sentence_input_length": 96, "sentence_target_length": 32}
SMOKE["recipe"] = {"steps": 2, "save_every": 2, "batch_size": 2, "input_length": 128, "target_length": 32,
                   "sentence_batch_size": 2, "sentence_input_length": 96, "sentence_target_length": 32}
# the methods: name -> train.py settings; `family` shares a learning rate chosen by its representative
METHODS = {
    "full": {"method": "full", "family": "full"},
    "ia3": {"method": "ia3", "family": "ia3"},
    "lora-r4": {"method": "lora", "rank": 4, "family": "lora"},
    "mov-10": {"method": "mov", "experts": 10, "family": "mov"},
    "mov-30": {"method": "mov", "experts": 30, "family": "mov"},
    "molora-10": {"method": "molora", "experts": 10, "rank": 4, "family": "molora"},
    "mov-10-top2": {"method": "mov", "experts": 10, "top_k": 2, "family": "mov"},
    "mov-10-top1": {"method": "mov", "experts": 10, "top_k": 1, "family": "mov"},
    "mov-10-sentence": {"method": "mov", "experts": 10, "router_input": "sentence", "family": "mov"},
    "lora-matched": {"method": "lora", "rank": "match:mov-30", "family": "lora"},
}
REPRESENTATIVE = {"full": "full", "ia3": "ia3", "lora": "lora-r4", "mov": "mov-10", "molora": "molora-10"}
# Adafactor scales each update by the parameter's RMS (floor 1e-3): zero-initialised LoRA B matrices start at the
# floor, so LoRA / MoLORA need larger rates than (IA)3 / MoV in a run of a few hundred steps
LR_GRID = {"full": [3e-4, 1e-3], "ia3": [1e-2, 3e-2], "mov": [1e-2, 3e-2], "lora": [1e-2, 1e-1],
           "molora": [1e-2, 1e-1]}
FULL["sweep"] = {"seeds": [0, 1, 2], "pilot_lr": {"mov": 1e-2, "full": 1e-3}, "ceiling": "full", "ceiling_seeds": [0]}
SMOKE["sweep"] = {"seeds": [0], "pilot_lr": {"mov": 1e-2, "full": 3e-4}, "ceiling": "full", "ceiling_seeds": [0]}
SMOKE_LR_GRID = {k: v[:1] for k, v in LR_GRID.items()}


def settings(size):
    return {"full": FULL, "smoke": SMOKE}[size]


def digest(obj, files=()):
    h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
    for f in files:
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:12]


def sweep_hash(size):
    """World, tasks, recipes, methods and learning-rate grids, with the source of the files that make them."""
    s = settings(size)
    return digest({"settings": s, "methods": METHODS, "grid": LR_GRID if size == "full" else SMOKE_LR_GRID},
                  TASK_FILES + ("config.py",))


def backbone_hash(size):
    s = settings(size)
    return digest({k: s[k] for k in ("world", "vocab", "backbone")}, BACKBONE_FILES)
