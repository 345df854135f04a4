"""A Llama-family language model in plain PyTorch, its checkpoint loaders and tokenizers.

One file, readable top to bottom: ModelArgs -> RMSNorm -> RoPE -> Attention -> FeedForward ->
TransformerBlock -> Transformer -> Tokenizer -> loaders -> CLI. Parameter names are Meta's
(`tok_embeddings`, `layers.N.attention.wq/wk/wv/wo`, `feed_forward.w1/w2/w3`, `attention_norm`,
`ffn_norm`, `norm`, `output`), so Meta checkpoints load with strict=True and adapters target
`wq`, `wv`, `wo`. q/k rows use Meta's interleaved RoPE layout; Hugging Face checkpoints are
permuted into it on load (GGUF files already store it).

    python llama.py smollm2-135m --prompt "The capital of France is"
    python llama.py /path/to/Meta-Llama-3-8B-Instruct --prompt "Hi" --chat --max-new-tokens 64

`load(path)` detects the format: a Meta directory (params.json, consolidated.*.pth,
tokenizer.model), a Hugging Face directory (config.json, *.safetensors, tokenizer.json or
tokenizer.model), or a `.gguf` file of the llama architecture. This module loads paths only;
built-in names such as `smollm2-135m` are resolved by fetch.py (the CLI does that).
"""

import argparse
import base64
import json
import math
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# configuration


@dataclass
class ModelArgs:
    """Meta's field names; defaults are Llama-3-8B's."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = 8
    vocab_size: int = 128256
    multiple_of: int = 1024  # FFN width rounding, Meta's rule
    ffn_dim_multiplier: float | None = 1.3
    hidden_dim: int | None = None  # explicit FFN width (HF / GGUF); overrides Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 frequency scaling
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False  # output head shares tok_embeddings.weight
    max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def check(self, keys: dict[str, str] | None = None) -> "ModelArgs":
        """Every field of the right type and positive, and heads that split dim into even halves.

        Raises ValueError naming the field as `keys` spells it (a file's own key, `hidden_size`,
        `llama.attention.head_count`), so that a loader can say which key of which file is wrong.
        """
        def name(f):
            return (keys or {}).get(f, f)

        for f in fields(self):
            v, kinds = getattr(self, f.name), typing.get_args(f.type) or (f.type,)
            if v is None and type(None) in kinds:
                continue
            kind = kinds[0]
            number = isinstance(v, int if kind is int else (int, float)) and not isinstance(v, bool)
            if not (isinstance(v, bool) if kind is bool else number and 0 < v < math.inf):
                what = {bool: "true or false", int: "a positive integer", float: "a positive number"}[kind]
                raise ValueError(f"{name(f.name)} must be {what}, got {json.dumps(v, default=repr)}")
        if self.dim % self.n_heads or self.head_dim % 2:  # RoPE rotates pairs of each head's dimensions
            raise ValueError(f"{name('dim')} {self.dim} does not split into {name('n_heads')} {self.n_heads} "
                             f"heads of even size")
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            raise ValueError(f"{name('n_heads')} {self.n_heads} is not a multiple of {name('n_kv_heads')} "
                             f"{self.n_kv_heads}")
        if self.use_scaled_rope and self.rope_low_freq_factor >= self.rope_high_freq_factor:
            raise ValueError(f"{name('rope_low_freq_factor')} must be below {name('rope_high_freq_factor')}")
        return self

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])


_LLAMA32 = dict(n_kv_heads=8, multiple_of=256, use_scaled_rope=True, rope_scaling_factor=32.0,
                tie_embeddings=True, max_seq_len=131072)
CONFIGS = {
    "llama3-8b": dict(),
    "llama3.1-8b": dict(use_scaled_rope=True, max_seq_len=131072),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5, **_LLAMA32),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0, **_LLAMA32),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                         hidden_dim=1536, rope_theta=100000.0, tie_embeddings=True),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=128,
                 rope_theta=10000.0, max_seq_len=512),
}

# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 even for bf16 activations, as Meta and HF do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """theta_i = base^(-2i/d), with Llama 3.1's smooth low-frequency scaling when enabled."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    if not args.use_scaled_rope:
        return inv_freq
    low_wavelen = args.rope_original_max_seq_len / args.rope_low_freq_factor
    high_wavelen = args.rope_original_max_seq_len / args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (args.rope_original_max_seq_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor)
    mid = (1 - smooth) * inv_freq / args.rope_scaling_factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / args.rope_scaling_factor, mid)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled)


def gather(x, at):
    """x (B, T, D) at positions at (B, P) -> (B, P, D)."""
    return x.gather(1, at[..., None].expand(-1, -1, x.size(-1)))


def apply_rope(x, freqs_cis):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position * theta_i, as one complex multiply
    (fewer kernels than the real-valued form on strided halves). x: (B, T, H, hd)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
    return torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2).type_as(x)  # freqs: (T | B,T, hd/2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # opt-in KV cache, see Transformer.setup_cache

    def forward(self, x, freqs_cis, start_pos: int = 0, at=None):
        """Queries at every position, or only at `at` (B, P) positions, each seeing keys up to its own."""
        B, T, _ = x.shape
        xq, fq = (x, freqs_cis) if at is None else (gather(x, at), freqs_cis[at])
        q = self.wq(xq).view(B, xq.size(1), self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, fq), apply_rope(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        mask = None
        if self.cache_k is not None:
            self.cache_k[:B, :, start_pos:start_pos + T] = k
            self.cache_v[:B, :, start_pos:start_pos + T] = v
            k = self.cache_k[:B, :, :start_pos + T]
            v = self.cache_v[:B, :, :start_pos + T]
            if start_pos > 0 and T > 1:  # new queries see the whole prefix plus a causal block
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        if at is not None:
            mask = (start_pos + at)[:, None, :, None] >= torch.arange(start_pos + T, device=x.device)  # (B,1,P,T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, xq.size(1), -1))  # (B, T | P, H*hd)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, start_pos: int = 0, at=None):
        """The residual stream (B, T, dim), or (B, P, dim) at the `at` positions only."""
        h = (x if at is None else gather(x, at)) + self.attention(self.attention_norm(x), freqs_cis, start_pos, at)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # a tied head reuses tok_embeddings.weight, so the state dict has no `output` key
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens, start_pos: int = 0, logits_at=None):
        """tokens (B, T) -> logits (B, T, V); with logits_at (B, P) positions -> (B, P, V).

        The head over a 49k-128k vocabulary is the largest single cost on short prompts,
        and training and scoring need it only at the answer positions.
        """
        B, T = tokens.shape
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
        pos = torch.arange(start_pos, start_pos + T, device=tokens.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        freqs_cis = torch.polar(torch.ones_like(angles), angles)  # cos + i sin, (T, hd/2)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        *body, last = self.layers
        for layer in body:
            h = layer(h, freqs_cis, start_pos)
        h = last(h, freqs_cis, start_pos, at=logits_at)  # with logits_at, the last block's queries, wo
        h = self.norm(h)  # and FFN run only there: ~1/n_layers of a step saved (3% measured, 135M, T=256)
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)

    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None):
        """Opt in to a KV cache for generation; `clear_cache()` turns it off again."""
        L = max_seq_len or self.args.max_seq_len
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            shape = (max_batch_size, a.n_kv_heads, L, a.head_dim)
            a.cache_k = torch.zeros(shape, dtype=w.dtype, device=w.device)
            a.cache_v = torch.zeros(shape, dtype=w.dtype, device=w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
        """Greedy decoding with the KV cache; returns the new token ids."""
        device = self.tok_embeddings.weight.device
        self.setup_cache(1, min(self.args.max_seq_len, len(prompt) + max_new_tokens))
        try:
            tokens = torch.tensor([prompt], device=device)
            out, pos = [], 0
            for _ in range(max_new_tokens):
                logits = self(tokens, start_pos=pos, logits_at=torch.tensor([[tokens.size(1) - 1]], device=device))
                pos += tokens.size(1)
                nxt = int(logits[0, -1].argmax())
                if nxt in stop_ids:
                    break
                out.append(nxt)
                tokens = torch.tensor([[nxt]], device=device)
            return out
        finally:
            self.clear_cache()


# -----------------------------------------------------------------------------
# tokenizers

# pre-tokenizer patterns of byte-level BPE vocabularies
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# SmolLM2 ("smollm"): digits split one by one, then GPT-2's pattern on the pieces between. A
# digit ends a piece, so a run of spaces before it stays whole: hence the wider lookahead.
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
PRE_TOKENIZERS = {"gpt2": GPT2_PATTERN, "default": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                  "llama3": LLAMA3_PATTERN, "smollm": SMOLLM_PATTERN}

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # unprintable bytes map to 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """encode / decode, special ids and the model's chat format, over tiktoken or sentencepiece."""

    def __init__(self, backend, specials: dict[str, int], bos_id: int, eos_id: int, pad_id: int | None = None,
                 chat_format: str | None = None):
        self.backend = backend  # tiktoken.Encoding or sentencepiece.SentencePieceProcessor
        self.specials = specials
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.chat_format = chat_format
        stops = {"llama3": ["<|eot_id|>", "<|eom_id|>"], "chatml": ["<|im_end|>"]}.get(chat_format, [])
        self.stop_ids = {eos_id} | {specials[s] for s in stops if s in specials}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Plain text to ids; special-token strings in the text are encoded as ordinary text."""
        if hasattr(self.backend, "encode_ordinary"):
            ids = self.backend.encode_ordinary(text)
        else:
            ids = self.backend.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if hasattr(self.backend, "encode_ordinary"):
            return self.backend.decode(ids)
        return self.backend.decode([i for i in ids if i not in (self.bos_id, self.eos_id, self.pad_id)])

    def encode_chat(self, user: str, system: str | None = None) -> list[int]:
        """One user turn, ending exactly where the assistant's reply begins."""
        sp = self.specials
        if self.chat_format == "llama3":  # Meta's ChatFormat: header, "\n\n", stripped content, eot
            def turn(role, content):
                return ([sp["<|start_header_id|>"]] + self.encode(role) + [sp["<|end_header_id|>"]]
                        + self.encode("\n\n") + self.encode(content.strip()) + [sp["<|eot_id|>"]])
            ids = [self.bos_id] + (turn("system", system) if system else []) + turn("user", user)
            return ids + [sp["<|start_header_id|>"]] + self.encode("assistant") + [sp["<|end_header_id|>"]] + self.encode("\n\n")
        if self.chat_format == "chatml":
            def turn(role, content):
                return [sp["<|im_start|>"]] + self.encode(f"{role}\n{content}") + [sp["<|im_end|>"]] + self.encode("\n")
            ids = (turn("system", system) if system else []) + turn("user", user)
            return ids + [sp["<|im_start|>"]] + self.encode("assistant\n")
        if self.chat_format == "llama2":
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}" if system else user
            return self.encode(f"[INST] {content.strip()} [/INST]", bos=True)
        return self.encode(user, bos=True)

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_bpe_vocab(cls, tokens: list[str], special_ids: set[int], pattern: str, bos_id: int, eos_id: int,
                       pad_id: int | None = None, name: str = "bpe") -> "Tokenizer":
        """A byte-level BPE vocabulary (GPT-2 characters) as tiktoken ranks: rank = token id.

        Byte-level BPE vocabularies list merged tokens in merge order, so a token's id is its
        merge priority and tiktoken's rank-driven merging reproduces the merges table.
        """
        import tiktoken

        dec = _byte_decoder()
        ranks, specials = {}, {}
        for i, tok in enumerate(tokens):
            if i in special_ids:
                specials[tok] = i
            else:
                ranks[bytes(dec[c] for c in tok)] = i
        enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        fmt = "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else None
        return cls(enc, specials, bos_id, eos_id, pad_id, fmt)

    @classmethod
    def from_tiktoken_file(cls, path: Path) -> "Tokenizer":
        """Llama 3's tokenizer.model: lines of base64(token) rank, then 256 special tokens."""
        import tiktoken

        ranks = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
        enc = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                special_tokens=specials)
        return cls(enc, specials, specials["<|begin_of_text|>"], specials["<|end_of_text|>"], None, "llama3")

    @classmethod
    def from_sentencepiece(cls, path: Path) -> "Tokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        pad = sp.pad_id() if sp.pad_id() >= 0 else None
        return cls(sp, {}, sp.bos_id(), sp.eos_id(), pad, "llama2")

    @classmethod
    def from_model_file(cls, path: Path) -> "Tokenizer":
        """tokenizer.model: a tiktoken rank file (Llama 3) or a sentencepiece protobuf (Llama 2)."""
        head = Path(path).read_bytes()[:256]
        try:
            first = head.decode().split("\n", 1)[0].split()
            if len(first) == 2 and first[1].isdigit():
                base64.b64decode(first[0], validate=True)
                return cls.from_tiktoken_file(path)
        except (UnicodeDecodeError, ValueError):
            pass
        return cls.from_sentencepiece(path)

    @classmethod
    def from_hf_json(cls, path: Path, config: dict) -> "Tokenizer":
        """tokenizer.json of a byte-level BPE model (Llama 3, SmolLM2, GPT-2 style)."""
        tj = json.loads(Path(path).read_text())
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise LoadError(f"{path}: tokenizer model type {model.get('type')!r} is not byte-level BPE")
        vocab = dict(model["vocab"])
        for t in tj.get("added_tokens", []):
            vocab[t["content"]] = t["id"]
        tokens = [None] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            tokens[i] = tok
        special_ids = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
        pattern = _hf_pre_tokenizer_pattern(tj.get("pre_tokenizer"), path)
        by_name = {tokens[i]: i for i in special_ids}

        def special(key, fallback):
            v = config.get(key)
            return v if isinstance(v, int) else by_name.get(fallback)

        bos = special("bos_token_id", "<|begin_of_text|>")
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        eos = eos if isinstance(eos, int) else by_name.get("<|end_of_text|>", by_name.get("<|endoftext|>"))
        missing = [i for i, t in enumerate(tokens) if t is None]
        if missing:
            raise LoadError(f"{path}: vocabulary has holes (no token for ids such as {missing[:3]})")
        return cls.from_bpe_vocab(tokens, special_ids, pattern, bos, eos, config.get("pad_token_id"), Path(path).name)


def _hf_pre_tokenizer_pattern(pre, path) -> str:
    """The regex that a tokenizer.json pre_tokenizer amounts to."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    types = [s.get("type") for s in steps]
    for s in steps:
        if s.get("type") == "Split" and "Regex" in s.get("pattern", {}):
            return s["pattern"]["Regex"]
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return SMOLLM_PATTERN
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    raise LoadError(f"{path}: unsupported pre_tokenizer {types}")


# -----------------------------------------------------------------------------
# checkpoint loading


class LoadError(ValueError):
    """A checkpoint a user handed us is missing, malformed or unsupported (one line)."""


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
    return _checked(ModelArgs(**{k: v for k, v in {**cfg, **overrides}.items() if k in known}), path)


def _build(args: ModelArgs, state: dict, source, device, dtype) -> Transformer:
    """Strictly fill a model built on the meta device: no second copy of the weights."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (" " if missing and unexpected else "") + (
            f"unexpected {unexpected[:3]}" if unexpected else "")
        raise LoadError(f"{source}: weights do not match the config ({what})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise LoadError(f"{source}: {k} has shape {tuple(state[k].shape)}, the config implies {tuple(shape)}")
    for k in state:
        state[k] = state[k].to(device=device, dtype=dtype or state[k].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)
    return model


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows as (first halves, second halves) per head; Meta interleaves pairs."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


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
    tok = path / "tokenizer.model"
    return _build(args, state, shards[0], device, dtype), Tokenizer.from_model_file(tok) if tok.exists() else None


HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "rope_scaling_factor": "rope_scaling.factor", "rope_low_freq_factor": "rope_scaling.low_freq_factor",
           "rope_high_freq_factor": "rope_scaling.high_freq_factor",
           "rope_original_max_seq_len": "rope_scaling.original_max_position_embeddings",
           "tie_embeddings": "tie_word_embeddings", "max_seq_len": "max_position_embeddings"}
HF_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def _load_hf(path: Path, device, dtype):
    from safetensors import safe_open

    where = path / "config.json"
    cfg = _read_config(where)
    _require(cfg, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"],
             where)
    if cfg.get("model_type", "llama") != "llama":
        raise LoadError(f"{where}: model_type {cfg['model_type']!r} is not llama")
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise LoadError(f"{where}: rope_scaling must be an object or null, got {json.dumps(rs)}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ("default", "llama3"):  # linear, dynamic, yarn ... would load and compute wrong logits
        raise LoadError(f"{where}: rope_scaling type {kind!r} is not supported (only llama3)")
    heads = cfg["num_attention_heads"]
    args = _checked(ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads", heads), vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rs.get("rope_theta", 10000.0)), use_scaled_rope=kind == "llama3",
        rope_scaling_factor=rs.get("factor", 8.0), rope_low_freq_factor=rs.get("low_freq_factor", 1.0),
        rope_high_freq_factor=rs.get("high_freq_factor", 4.0),
        rope_original_max_seq_len=rs.get("original_max_position_embeddings", 8192),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_seq_len=cfg.get("max_position_embeddings", 8192)), where, HF_KEYS)
    if cfg.get("head_dim") not in (None, args.head_dim):
        raise LoadError(f"{where}: head_dim {json.dumps(cfg['head_dim'])} != hidden_size / num_attention_heads "
                        f"({args.head_dim}) is not supported")
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).exists():
            raise LoadError(f"{path / name}: no such file (HF directories need safetensors weights)")
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                k = key.removeprefix("model.")
                if k == "lm_head.weight":
                    if args.tie_embeddings:
                        continue
                    k = "output.weight"
                k = k.replace("embed_tokens", "tok_embeddings")
                if k == "norm.weight" or k.startswith(("tok_embeddings", "output")):
                    state[k] = f.get_tensor(key)
                    continue
                for hf, meta in HF_NAMES.items():
                    k = k.replace(f".{hf}.", f".{meta}.")
                t = f.get_tensor(key)
                if k.endswith("attention.wq.weight"):
                    t = hf_to_meta_qk(t, args.n_heads)
                elif k.endswith("attention.wk.weight"):
                    t = hf_to_meta_qk(t, args.n_kv_heads)
                state[k] = t
    tok = None
    if (path / "tokenizer.json").exists():
        ids = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        tok = Tokenizer.from_hf_json(path / "tokenizer.json", ids)
    elif (path / "tokenizer.model").exists():
        tok = Tokenizer.from_model_file(path / "tokenizer.model")
    return _build(args, state, path / files[0], device, dtype), tok


GGUF_KEYS = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
             "n_heads": "llama.attention.head_count", "n_kv_heads": "llama.attention.head_count_kv",
             "vocab_size": "llama.vocab_size",
             "hidden_dim": "llama.feed_forward_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
             "rope_theta": "llama.rope.freq_base", "max_seq_len": "llama.context_length"}
GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "attn_q": "attention.wq",
              "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
              "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def _load_gguf(path: Path, device, dtype):
    """A llama-architecture GGUF file; tensors dequantized by the gguf package."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LoadError(f"{path}: GGUF architecture is {arch!r}; only 'llama' is supported")
    _require(meta, [f"llama.{k}" for k in ("embedding_length", "block_count", "attention.head_count",
                                           "feed_forward_length")], path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in r.fields else None
    n_heads = meta["llama.attention.head_count"]
    args = _checked(ModelArgs(
        dim=meta["llama.embedding_length"], n_layers=meta["llama.block_count"], n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        vocab_size=meta.get("llama.vocab_size", len(tokens or [])), hidden_dim=meta["llama.feed_forward_length"],
        norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0), max_seq_len=meta.get("llama.context_length", 8192),
        tie_embeddings=not any(t.name == "output.weight" for t in r.tensors)), path, GGUF_KEYS)
    state, rope_freqs = {}, None
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        w = torch.from_numpy(a if a.flags.writeable else a.copy())  # F32 tensors come as read-only mmap views
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
    tok = _gguf_tokenizer(r, path) if tokens is not None else None
    return _build(args, state, path, device, dtype), tok


def _match_rope_freqs(args, rope_freqs, meta, path) -> ModelArgs:
    base = ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
    for factor in (meta.get("llama.rope.scaling.factor"), 8.0, 32.0, 16.0):
        if factor is None:
            continue
        cand = ModelArgs(**{**args.__dict__, "use_scaled_rope": True, "rope_scaling_factor": float(factor),
                            "rope_original_max_seq_len": meta.get("llama.rope.scaling.original_context_length", 8192)})
        if torch.allclose(rope_inv_freq(base) / rope_freqs, rope_inv_freq(cand), rtol=1e-4):
            return cand
    raise LoadError(f"{path}: rope_freqs.weight matches no Llama 3.1 frequency scaling")


def _gguf_tokenizer(r, path) -> Tokenizer:
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.ggml.")}
    if f.get("tokenizer.ggml.model") != "gpt2":
        raise LoadError(f"{path}: GGUF tokenizer model {f.get('tokenizer.ggml.model')!r} is not supported (only byte-level BPE 'gpt2')")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise LoadError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    types = f.get("tokenizer.ggml.token_type", [])
    special_ids = {i for i, t in enumerate(types) if t in (3, 4)}  # CONTROL, USER_DEFINED
    return Tokenizer.from_bpe_vocab(f["tokenizer.ggml.tokens"], special_ids, PRE_TOKENIZERS[pre],
                                    f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id"),
                                    f.get("tokenizer.ggml.padding_token_id"), Path(path).name)


def load(path, device="cpu", dtype=None):
    """Load a Meta directory, a Hugging Face directory or a llama GGUF file -> (model, tokenizer).

    Errors in what the user handed us raise LoadError with one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "params.json").exists():
            loader = _load_meta
        elif (path / "config.json").exists():
            loader = _load_hf
        else:
            raise LoadError(f"{path}: not a model directory (no params.json or config.json)")
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise LoadError(f"{path}: unknown format (not a GGUF file or a model directory)")
        loader = _load_gguf
    try:
        model, tok = loader(path, device, dtype)
    except (LoadError, FileNotFoundError):
        raise
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: malformed JSON ({e})") from None
    except Exception as e:  # truncated or corrupt files surface deep inside torch / gguf / safetensors
        raise LoadError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return model.eval(), tok


# -----------------------------------------------------------------------------
# CLI


def main():
    p = argparse.ArgumentParser(description="Greedy generation with a Llama-family model.")
    p.add_argument("model", help="a built-in name (smollm2-135m) or a Meta / Hugging Face directory or .gguf file")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    try:
        try:
            import fetch  # built-in names live apart from the loaders, so this file stays copyable
            path = fetch.resolve_model(args.model)
        except ImportError:
            path = args.model
        model, tok = load(path, device=args.device, dtype=getattr(torch, args.dtype))
    except (LoadError, RuntimeError) as e:  # fetch.FetchError is a RuntimeError
        sys.exit(f"error: {e}")
    if tok is None:
        sys.exit(f"error: {args.model}: no tokenizer found beside the weights")
    ids = tok.encode_chat(args.prompt) if args.chat else tok.encode(args.prompt, bos=tok.chat_format in ("llama3", "llama2"))
    out = model.generate(ids, args.max_new_tokens, stop_ids=tok.stop_ids)
    print(args.prompt + tok.decode(out) if not args.chat else tok.decode(out))


if __name__ == "__main__":
    main()
