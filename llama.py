"""A Llama-family language model in plain PyTorch, in the class order of Meta's model.py.

Readable top to bottom: ModelArgs -> RMSNorm -> RoPE -> Attention -> FeedForward ->
TransformerBlock -> Transformer, then random_model, load and the CLI. Parameter names are Meta's
(`tok_embeddings`, `layers.N.attention.wq/wk/wv/wo`, `feed_forward.w1/w2/w3`, `attention_norm`,
`ffn_norm`, `norm`, `output`), so Meta checkpoints load with strict=True and adapters target
`wq`, `wv`, `wo`. q/k rows use Meta's interleaved RoPE layout; Hugging Face checkpoints are
permuted into it on load (hf.py; GGUF files already store it).

    python llama.py smollm2-135m --prompt "The capital of France is"
    python llama.py /path/to/Meta-Llama-3-8B-Instruct --prompt "Hi" --chat --max-new-tokens 64

`load(path)` detects the format: a Meta directory (params.json, consolidated.*.pth,
tokenizer.model), a Hugging Face directory (config.json, *.safetensors, tokenizer.json or
tokenizer.model), or a `.gguf` file of the llama architecture; loaders.py reads them and
tokenizer.py holds the tokenizers. This module loads paths only; built-in names such as
`smollm2-135m` are resolved by fetch.py (the CLI does that).
"""

import argparse
import json
import math
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import LoadError  # the one error type of a bad checkpoint, raised by load

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
                what = {bool: "true or false", int: "a positive integer",
                        float: "a positive number"}[kind]
                got = json.dumps(v, default=repr)
                raise ValueError(f"{name(f.name)} must be {what}, got {got}")
        # RoPE rotates pairs of each head's dimensions
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"{name('dim')} {self.dim} does not split into {name('n_heads')} "
                             f"{self.n_heads} heads of even size")
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            raise ValueError(f"{name('n_heads')} {self.n_heads} is not a multiple of "
                             f"{name('n_kv_heads')} {self.n_kv_heads}")
        if self.use_scaled_rope and self.rope_low_freq_factor >= self.rope_high_freq_factor:
            raise ValueError(f"{name('rope_low_freq_factor')} must be below "
                             f"{name('rope_high_freq_factor')}")
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


def autocast_weight(owner: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w as F.linear(x, w) runs it: under autocast a frozen fp32 weight is cast to autocast's dtype
    once and kept on `owner`, made anew when the weight changes (another tensor, or an in-place
    update, which bumps its version). torch's autocast caches only weights that require grad, so
    a frozen model's were re-cast in every forward: 13% of a bf16-autocast LoRA step on a CPU
    (prof.py). The cost: a bf16 copy of each frozen weight, +2 bytes a parameter while it lives.
    The numbers are autocast's own (the same round-to-nearest cast); anything else passes through."""
    dev = x.device.type
    if w.requires_grad or w.dtype != torch.float32 or not torch.is_autocast_enabled(dev):
        return w
    dt = torch.get_autocast_dtype(dev)
    key = (w.data_ptr(), w._version, w.shape, w.device, dt)
    cached = owner.__dict__.get(_KEPT_CAST)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # usable by a later training step
            cached = owner.__dict__[_KEPT_CAST] = (key, w.to(dt))
    return cached[1]


_KEPT_CAST = "_autocast_weight"  # (key, cast) on the owning module, outside its state dict


def kept_casts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The casts autocast_weight keeps, by owning module's name: resident between steps."""
    return {n: m.__dict__[_KEPT_CAST][1] for n, m in model.named_modules()
            if _KEPT_CAST in m.__dict__}


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) whose frozen weight autocast casts once."""

    def forward(self, x):
        return F.linear(x, autocast_weight(self, self.weight, x), self.bias)


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
    (fewer kernels than the real-valued form on strided halves). x: (B, T, H, hd), freqs_cis:
    (T, hd/2), or (B, T, hd/2) at gathered positions."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
    return torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2).type_as(x)  # (B, T, H, hd)


def attention(q, k, v, mask, causal: bool, gqa: bool):
    """softmax(q k^T / sqrt(hd) + mask) v. On a CPU in fp32 whatever the activations' dtype
    (bf16 weights, or autocast): torch's CPU attention kernels run bf16 ~2.4x slower than fp32,
    forward and backward (prof.py), and q, k, v are small (B, H, T, hd); bf16 out as before."""
    low = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    if not low:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=gqa)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                           is_causal=causal, enable_gqa=gqa)
    return y.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.head_dim
        self.wq = Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # opt-in KV cache, see Transformer.setup_cache

    def forward(self, x, freqs_cis, start_pos: int = 0, at=None):
        """Queries at every position, or only at `at` (B, P) positions, each seeing keys up to
        its own."""
        B, T, _ = x.shape
        xq, fq = (x, freqs_cis) if at is None else (gather(x, at), freqs_cis[at])
        q = self.wq(xq).view(B, xq.size(1), self.n_heads, self.head_dim)  # (B, T | P, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, hd)
        q, k = apply_rope(q, fq), apply_rope(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        mask = None
        if self.cache_k is not None:
            self.cache_k[:B, :, start_pos:start_pos + T] = k
            self.cache_v[:B, :, start_pos:start_pos + T] = v
            k = self.cache_k[:B, :, :start_pos + T]
            v = self.cache_v[:B, :, :start_pos + T]
            if start_pos > 0 and T > 1:  # new queries see the whole prefix plus a causal block
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device)
                mask = mask.tril(start_pos)  # (T, start_pos + T)
        if at is not None:
            keys = torch.arange(start_pos + T, device=x.device)
            mask = (start_pos + at)[:, None, :, None] >= keys  # (B, 1, P, T)
        y = attention(q, k, v, mask, mask is None and T > 1, self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, xq.size(1), -1))  # (B, T | P, H*hd)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w2 = Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.w3 = Linear(args.dim, args.ffn_dim, bias=False)  # up

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
        # the residual first: autograd accumulates x's two gradients in the order they were made
        res = x if at is None else gather(x, at)  # (B, T | P, dim)
        h = res + self.attention(self.attention_norm(x), freqs_cis, start_pos, at)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # a tied head reuses tok_embeddings.weight, so the state dict has no `output` key
        tied = args.tie_embeddings
        self.output = None if tied else Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, tokens, start_pos: int = 0, logits_at=None):
        """tokens (B, T) -> logits (B, T, V); with logits_at (B, P) positions -> (B, P, V).

        The head over a 49k-128k vocabulary is the largest single cost on short prompts,
        and training and scoring need it only at the answer positions.
        """
        B, T = tokens.shape
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len "
                             f"{self.args.max_seq_len}")
        pos = torch.arange(start_pos, start_pos + T, device=tokens.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        freqs_cis = torch.polar(torch.ones_like(angles), angles)  # cos + i sin, (T, hd/2)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        *body, last = self.layers
        for layer in body:
            h = layer(h, freqs_cis, start_pos)
        # with logits_at, the last block's queries, wo and FFN run only there: ~1/n_layers of a
        # step saved (3% measured, 135M, T=256)
        h = last(h, freqs_cis, start_pos, at=logits_at)  # (B, T | P, dim)
        h = self.norm(h)
        if self.output is not None:
            return self.output(h)
        return F.linear(h, autocast_weight(self.tok_embeddings, self.tok_embeddings.weight, h))

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
                at = torch.tensor([[tokens.size(1) - 1]], device=device)  # the last position only
                logits = self(tokens, start_pos=pos, logits_at=at)  # (1, 1, V)
                pos += tokens.size(1)
                nxt = int(logits[0, -1].argmax())
                if nxt in stop_ids:
                    break
                out.append(nxt)
                tokens = torch.tensor([[nxt]], device=device)
            return out
        finally:
            self.clear_cache()


def random_model(args: ModelArgs, device="cpu", dtype=torch.float32, seed: int = 0) -> Transformer:
    """Random weights of a shape (N(0, 0.02), norms 1) made on the device itself: built on meta,
    then to_empty, so no CPU copy exists (an 8B bf16 model is ready in about a second on a GPU).
    For timing and memory only."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    model.inv_freq = rope_inv_freq(args).to(device)  # fp32, as load() keeps it
    return model.eval()


def load(path, device="cpu", dtype=None):
    """A Meta directory, a Hugging Face directory or a llama GGUF file -> (model, tokenizer).

    loaders.py reads the three formats into Meta's names and fills a model built on the meta
    device; errors in what the user handed us raise LoadError with one line naming the file.
    """
    import loaders  # here, not at the top: loaders.py imports this module

    return loaders.load(path, device, dtype)


# -----------------------------------------------------------------------------
# CLI


def main():
    p = argparse.ArgumentParser(description="Greedy generation with a Llama-family model.")
    p.add_argument("model", help="a built-in name (smollm2-135m) or a Meta / Hugging Face "
                   "directory or .gguf file")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight dtype")
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
    if args.chat:
        ids = tok.encode_chat(args.prompt)
    else:
        ids = tok.encode(args.prompt, bos=tok.chat_format in ("llama3", "llama2"))
    out = model.generate(ids, args.max_new_tokens, stop_ids=tok.stop_ids)
    print(args.prompt + tok.decode(out) if not args.chat else tok.decode(out))


if __name__ == "__main__":
    main()
