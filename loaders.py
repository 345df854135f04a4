"""Checkpoints into a Transformer: Meta directories, Hugging Face directories, llama GGUF files.

The shape of gpt-fast's model loading (generate.py `_load_model`, scripts/convert_hf_checkpoint.py):
read the weights without a second copy (torch.load(mmap=True, weights_only=True), safetensors),
rename them into Meta's names (hf.WEIGHT_MAP for Hugging Face, GGUF_NAMES for GGUF), build the
model on the meta device and `load_state_dict(strict=True, assign=True)`: no key dropped silently.

    model, tok = llama.load("Llama-3.2-1B/original")  # params.json, consolidated.*.pth
    model, tok = llama.load("SmolLM2-135M-Instruct")   # config.json, *.safetensors
    model, tok = llama.load("SmolLM2-135M.Q4_1.gguf")  # dequantized by the gguf package

`load` (llama.load) detects the format from the path. Errors in what a user handed us raise
LoadError with one line naming the file and, for a bad config value, the file's own key.
"""

import json
from dataclasses import fields
from pathlib import Path

import torch

import hf
from llama import ModelArgs, Transformer, rope_inv_freq
from tokenizer import LoadError, Tokenizer


def load(path, device="cpu", dtype=None):
    """A Meta directory, a Hugging Face directory or a llama GGUF file -> (model, tokenizer)."""
    path = Path(path)
    loader = _loader(path)
    try:
        model, tok = loader(path, device, dtype)
    except (LoadError, FileNotFoundError):
        raise
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: malformed JSON ({e})") from None
    except Exception as e:  # truncated or corrupt files fail deep inside torch / gguf / safetensors
        first = str(e).splitlines()[0] if str(e) else ""
        raise LoadError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first})") from None
    return model.eval(), tok


def _loader(path: Path):
    """The reader of the format `path` holds."""
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "params.json").exists():
            return _load_meta
        if (path / "config.json").exists():
            return _load_hf
        raise LoadError(f"{path}: not a model directory (no params.json or config.json)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LoadError(f"{path}: unknown format (not a GGUF file or a model directory)")
    return _load_gguf


# -----------------------------------------------------------------------------
# shared: configs checked, the model built strictly


def _require(cfg: dict, keys, path) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise LoadError(f"{path}: missing keys {', '.join(missing)}")


def _read_config(path: Path) -> dict:
    """A JSON object from config.json / params.json; anything else is one line naming the file."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _checked(args: ModelArgs, path, keys: dict[str, str] | None = None) -> ModelArgs:
    """args.check() as a LoadError naming the file and its key."""
    try:
        return args.check(keys)
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from None


def _args_from(cfg: dict, path, **overrides) -> ModelArgs:
    known = {f.name for f in fields(ModelArgs)}
    cfg = {k: v for k, v in {**cfg, **overrides}.items() if k in known}
    return _checked(ModelArgs(**cfg), path)


def _build(args: ModelArgs, state: dict, source, device, dtype) -> Transformer:
    """Strictly fill a model built on the meta device: no second copy of the weights."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = [f"missing {missing[:3]}"] if missing else []
        what += [f"unexpected {unexpected[:3]}"] if unexpected else []
        raise LoadError(f"{source}: weights do not match the config ({' '.join(what)})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise LoadError(f"{source}: {k} has shape {tuple(state[k].shape)}, "
                            f"the config implies {tuple(shape)}")
    for k in state:
        state[k] = state[k].to(device=device, dtype=dtype or state[k].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)
    return model


# -----------------------------------------------------------------------------
# Meta: params.json, consolidated.*.pth, tokenizer.model


def _load_meta(path: Path, device, dtype):
    params = _read_config(path / "params.json")
    _require(params, ["dim", "n_layers", "n_heads", "vocab_size", "norm_eps"], path / "params.json")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise LoadError(f"{path}: params.json found but no consolidated.*.pth")
    parts = [torch.load(s, map_location="cpu", mmap=True, weights_only=True) for s in shards]
    state = {}
    for k in parts[0]:
        if k == "rope.freqs":
            continue
        ts = [p[k] for p in parts]
        # model-parallel shards: column-parallel weights split rows, row-parallel split columns
        cat = 1 if k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
        state[k] = ts[0] if len(ts) == 1 or ts[0].dim() == 1 else torch.cat(ts, dim=cat)
    args = _args_from(params, path / "params.json", tie_embeddings="output.weight" not in state)
    tok_file = path / "tokenizer.model"
    tok = Tokenizer.from_model_file(tok_file) if tok_file.exists() else None
    return _build(args, state, shards[0], device, dtype), tok


# -----------------------------------------------------------------------------
# Hugging Face: config.json, *.safetensors, tokenizer.json or tokenizer.model

# ModelArgs field -> config.json key, for errors that name the file's own key
HF_KEYS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "hidden_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_scaling_factor": "rope_scaling.factor",
    "rope_low_freq_factor": "rope_scaling.low_freq_factor",
    "rope_high_freq_factor": "rope_scaling.high_freq_factor",
    "rope_original_max_seq_len": "rope_scaling.original_max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
    "max_seq_len": "max_position_embeddings",
}


def _hf_args(cfg: dict, where: Path) -> ModelArgs:
    """config.json of a LlamaForCausalLM -> ModelArgs (Llama 3.1's rope scaling included)."""
    _require(cfg, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "vocab_size"], where)
    if cfg.get("model_type", "llama") != "llama":
        raise LoadError(f"{where}: model_type {cfg['model_type']!r} is not llama")
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise LoadError(f"{where}: rope_scaling must be an object or null, got {json.dumps(rs)}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ("default", "llama3"):  # linear, yarn ...: would load, logits wrong
        raise LoadError(f"{where}: rope_scaling type {kind!r} is not supported (only llama3)")
    heads = cfg["num_attention_heads"]
    args = _checked(ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads", heads), vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rs.get("rope_theta", 10000.0)),
        use_scaled_rope=kind == "llama3", rope_scaling_factor=rs.get("factor", 8.0),
        rope_low_freq_factor=rs.get("low_freq_factor", 1.0),
        rope_high_freq_factor=rs.get("high_freq_factor", 4.0),
        rope_original_max_seq_len=rs.get("original_max_position_embeddings", 8192),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_seq_len=cfg.get("max_position_embeddings", 8192)), where, HF_KEYS)
    if cfg.get("head_dim") not in (None, args.head_dim):
        raise LoadError(f"{where}: head_dim {json.dumps(cfg['head_dim'])} != hidden_size / "
                        f"num_attention_heads ({args.head_dim}) is not supported")
    return args


def _load_hf(path: Path, device, dtype):
    from safetensors import safe_open

    cfg = _read_config(path / "config.json")
    args = _hf_args(cfg, path / "config.json")
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state = {}
    for name in files:
        if not (path / name).exists():
            raise LoadError(f"{path / name}: no such file "
                            f"(HF directories need safetensors weights)")
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                k = key.removeprefix("model.")  # a LlamaModel's save has no prefix
                if k == "lm_head.weight" and args.tie_embeddings:
                    continue
                hf_key = k if k == "lm_head.weight" else f"model.{k}"
                meta, t = hf.convert(hf_key, f.get_tensor(key), args)
                state[meta or k] = t  # a key outside hf.WEIGHT_MAP: _build names it as unexpected
    tok = None
    if (path / "tokenizer.json").exists():
        ids = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        tok = Tokenizer.from_hf_json(path / "tokenizer.json", ids)
    elif (path / "tokenizer.model").exists():
        tok = Tokenizer.from_model_file(path / "tokenizer.model")
    return _build(args, state, path / files[0], device, dtype), tok


# -----------------------------------------------------------------------------
# GGUF: one file, llama.cpp's names, q / k rows already in Meta's layout

# ModelArgs field -> GGUF metadata key
GGUF_KEYS = {
    "dim": "llama.embedding_length",
    "n_layers": "llama.block_count",
    "n_heads": "llama.attention.head_count",
    "n_kv_heads": "llama.attention.head_count_kv",
    "vocab_size": "llama.vocab_size",
    "hidden_dim": "llama.feed_forward_length",
    "norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base",
    "max_seq_len": "llama.context_length",
}
# llama.cpp's tensor name (blk.N.attn_q.weight) -> Meta's (layers.N.attention.wq.weight)
GGUF_NAMES = {
    "token_embd": "tok_embeddings",
    "output_norm": "norm",
    "output": "output",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


def _load_gguf(path: Path, device, dtype):
    """A llama-architecture GGUF file; tensors dequantized by the gguf package."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LoadError(f"{path}: GGUF architecture is {arch!r}; only 'llama' is supported")
    _require(meta, [f"llama.{k}" for k in ("embedding_length", "block_count",
                                           "attention.head_count", "feed_forward_length")], path)
    tokens = None
    if "tokenizer.ggml.tokens" in r.fields:
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
    n_heads = meta["llama.attention.head_count"]
    args = _checked(ModelArgs(
        dim=meta["llama.embedding_length"], n_layers=meta["llama.block_count"], n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        vocab_size=meta.get("llama.vocab_size", len(tokens or [])),
        hidden_dim=meta["llama.feed_forward_length"],
        norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        max_seq_len=meta.get("llama.context_length", 8192),
        tie_embeddings=not any(t.name == "output.weight" for t in r.tensors)), path, GGUF_KEYS)
    state, rope_freqs = {}, None
    for t in r.tensors:
        shape = tuple(reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        w = torch.from_numpy(a if a.flags.writeable else a.copy())  # F32: read-only mmap views
        if t.name == "rope_freqs.weight":  # Llama 3.1: the per-frequency divisors, as a tensor
            rope_freqs = w.float()
            continue
        parts = t.name.split(".")
        if parts[0] == "blk":
            state[f"layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.weight"] = w
        else:
            state[f"{GGUF_NAMES.get(parts[0], parts[0])}.weight"] = w
    if rope_freqs is not None:
        args = _match_rope_freqs(args, rope_freqs, meta, path)
    fields_ = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.ggml.")}
    tok = Tokenizer.from_gguf(fields_, path) if tokens is not None else None
    return _build(args, state, path, device, dtype), tok


def _match_rope_freqs(args, rope_freqs, meta, path) -> ModelArgs:
    """The Llama 3.1 scaling whose frequencies a GGUF file's rope_freqs.weight divides out."""
    base = ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
    original = meta.get("llama.rope.scaling.original_context_length", 8192)
    for factor in (meta.get("llama.rope.scaling.factor"), 8.0, 32.0, 16.0):
        if factor is None:
            continue
        cand = ModelArgs(**{**args.__dict__, "use_scaled_rope": True,
                            "rope_scaling_factor": float(factor),
                            "rope_original_max_seq_len": original})
        if torch.allclose(rope_inv_freq(base) / rope_freqs, rope_inv_freq(cand), rtol=1e-4):
            return cand
    raise LoadError(f"{path}: rope_freqs.weight matches no Llama 3.1 frequency scaling")
