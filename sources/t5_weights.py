"""Loading Hugging Face T5 checkpoints into t5.T5: config.json, files, hub download, the strict name and shape check.

The paper adapts the T5 v1.1 LM-adapted checkpoints (Lester et al. 2021), released for T5X as
`t5_1_1_lm100k_<size>` (the original's `configs/*.gin`) and on the Hugging Face hub as `google/t5-<size>-lm-adapt`,
whose weight names t5.py keeps. A checkpoint is a directory (or hub repository) holding config.json and
model.safetensors, pytorch_model.bin, or shards of either with their `*.index.json`. Tensors are read lazily
(safetensors, memory-mapped zip .bin) and `.bin` files only with `torch.load(weights_only=True)`: nothing is
unpickled beyond tensors.

    model = t5_weights.load("google/t5-xl-lm-adapt")        # a t5.T5 in eval mode, fp32 on the CPU
    config = t5_weights.read_config("DIR/config.json")     # a t5.T5Config
"""
import dataclasses
import json
import os
import zipfile

import torch

import t5
from sources import hub


def load(name_or_path, dtype=torch.float32, device="cpu"):
    """A t5.T5 with the checkpoint's weights, in eval mode.
    Tying is decided by the files (is there an `lm_head.weight`?): transformers 5.x writes tie_word_embeddings=True
    even for the untied v1.1."""
    path = resolve(name_or_path)
    shards = {f: _open_weights(os.path.join(path, f)) for f in _weight_files(path)}  # headers only
    found = {k: (f, shape) for f, (shapes, _) in shards.items() for k, shape in shapes.items() if k not in _ALIASES}
    try:
        config = dataclasses.replace(read_config(path), tie_word_embeddings="lm_head.weight" not in found)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{os.path.join(path, 'config.json')} is not a T5 config: {type(e).__name__} {e}") from e
    with torch.device("meta"):
        model = t5.T5(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k} {found[k][1]} in {found[k][0]}, model wants {s}" for k, s in expected.items()
             if k in found and found[k][1] != s]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} does not match its config.json ({config}): missing tensors "
                         f"{missing}; unexpected tensors {unexpected}; wrong shapes {wrong}")
    for file, (shapes, get) in shards.items():
        try:
            state = {k: get(k).to(device=device, dtype=dtype) for k in shapes if k in expected}
        except Exception as e:  # a truncated or corrupt file: safetensors' own error type, or torch's
            raise ValueError(f"{os.path.join(path, file)} cannot be read ({type(e).__name__}: {e}); download it "
                             "again") from e
        model.load_state_dict(state, strict=False, assign=True)
    # T5 has no non-persistent buffers; this check catches any later addition left on the meta device
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading {path}: {left}")
    return model.eval()


# HF aliases of shared.weight, and a cross-attention bias old HF checkpoints carry unused (HF ignores it too)
_ALIASES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
_WEIGHT_LAYOUTS = [("model.safetensors.index.json", "model.safetensors"),
                   ("pytorch_model.bin.index.json", "pytorch_model.bin")]


def _weight_files(path):
    """Weight files of a HF-layout directory, safetensors first; sharded files come from their index JSON."""
    for index, single in _WEIGHT_LAYOUTS:
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        if os.path.exists(os.path.join(path, single)):
            return [single]
    raise FileNotFoundError(f"no weights in {path}: looked for {[n for layout in _WEIGHT_LAYOUTS for n in layout]}")


def _open_weights(file):
    """({name: shape}, get(name) -> tensor) for one file, reading tensors lazily (safetensors, mmap'd .bin)."""
    try:
        return _open_lazily(file)
    except Exception as e:  # a truncated header or zip: safetensors' and torch's own error types
        raise ValueError(f"{file} cannot be read ({type(e).__name__}: {e}); download it again") from e


def _open_lazily(file):
    if file.endswith(".safetensors"):
        from safetensors import safe_open
        f = safe_open(file, framework="pt", device="cpu")
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.get_tensor
    # zip-format .bin (torch >= 1.6) is memory-mapped like safetensors; a legacy (pre-1.6) .bin is read whole
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    return {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__


def read_config(path_or_dict):
    """A t5.T5Config from a HF config.json: a dict, the file, or its directory. Tying is only a guess
    here: `load` decides it from the weight files. Rescaling follows `scale_decoder_outputs` (transformers 5.x
    writes it and always says tie_word_embeddings=True) or else `tie_word_embeddings` (hub files written by 4.x)."""
    d = path_or_dict
    if not isinstance(d, dict):
        path = os.path.join(d, "config.json") if os.path.isdir(d) else d
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); download the model's config.json again") from e
    if d.get("model_type", "t5") not in ("t5", "mt5"):
        raise ValueError(f"config model_type is {d['model_type']!r}; this file implements T5 only")
    tie = d.get("tie_word_embeddings", True)  # HF's default when the key is absent
    kw = {f.name: d[f.name] for f in dataclasses.fields(t5.T5Config) if d.get(f.name) is not None}
    kw.update(num_decoder_layers=d.get("num_decoder_layers") or d["num_layers"], tie_word_embeddings=tie,
              scale_decoder_outputs=d.get("scale_decoder_outputs", tie))
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    return t5.T5Config(**kw)


def resolve(name_or_path):
    """A local directory as is; else a hub name fetched with huggingface_hub (safetensors, else .bin files)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    state = "not a directory" if os.path.exists(name_or_path) else "no such directory"
    missing = f"no checkpoint {name_or_path!r}: {state} ({os.path.abspath(name_or_path)})"
    how = ("pass a local directory holding config.json and model.safetensors or pytorch_model.bin (HF layout), "
           "e.g. made with `hf download google/t5-xl-lm-adapt --local-dir DIR` where the hub is reachable")
    if not hub.could_be_repo_id(name_or_path):
        raise FileNotFoundError(f"{missing}, and not a hub name (namespace/name) either. Fix: {how}")
    from huggingface_hub import snapshot_download
    try:
        path = snapshot_download(name_or_path, allow_patterns=["config.json", "model*.safetensors*"])
        if not any(os.path.exists(os.path.join(path, n)) for layout in _WEIGHT_LAYOUTS for n in layout):
            path = snapshot_download(name_or_path, allow_patterns=["config.json", "pytorch_model*.bin*"])
    except hub.failures() as e:  # huggingface_hub's network, offline and not-found errors, its client's
        why = hub.reason(e, "model", name_or_path)
        raise (FileNotFoundError if why.startswith("no model repository") else OSError)(
            f"{missing}, and {why}. Fix: {how}") from e
    return path
