"""llama.py, loaders.py, tokenizer.py and hf.py against independent references: transformers'
LlamaForCausalLM (HF safetensors, Meta layout, GGUF), Hugging Face tokenizers, sentencepiece.
Every checkpoint and tokenizer here is made by the test itself; the real SmolLM2 GGUF is used
only when it is already cached."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llama
import tokenizer
from llama import LoadError, ModelArgs, Transformer, load
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 1234567890 numbers 42 and 7.",
    "def f(x):\n    return x ** 2  # code with    spaces\n\n\ttabs",
    "café naïve résumé Zürich 日本語のテキスト 中文 emoji 🎉👍🏽 I'll they've we're",
    "Return the label of the correct answer for the question below.\n\nQuestion: a b\n\nChoices:\nA) yes\nB) no",
] * 20
TEXTS = ["Hello world! 12345 numbers   and  spaces\n\n\tTabs", "def f(x):\n    return x**2  # code",
         "café naïve résumé", "日本語のテキスト 中文", "emoji 🎉👍🏽 done", "  leading and trailing  ",
         "a   1   b 22 333", "I'll they've WE'RE", "line\r\nbreaks\n\n\nthree", "€100 or $3.50?!"]


# -----------------------------------------------------------------------------
# model: shapes, head at chosen positions, KV cache


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**llama.CONFIGS["tiny"], **kw}))
    for p in model.parameters():  # non-trivial norms too
        p.data.normal_(0, 0.3 if p.dim() == 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def test_from_name_known_configs():
    assert ModelArgs().ffn_dim == 14336  # Llama-3-8B from Meta's rule
    assert ModelArgs.from_name("llama3.2-1b").ffn_dim == 8192
    assert ModelArgs.from_name("llama3.2-3b").ffn_dim == 8192
    s = ModelArgs.from_name("smollm2-135m")
    assert (s.n_layers, s.dim, s.n_heads, s.n_kv_heads, s.vocab_size, s.tie_embeddings) == (30, 576, 9, 3, 49152, True)
    assert ModelArgs.from_name("llama3.1-8b").use_scaled_rope
    with pytest.raises(ValueError):
        ModelArgs.from_name("gpt-5")


def test_logits_at_equals_full_logits():
    model = tiny_model()
    tokens = torch.randint(0, 512, (2, 12))
    full = model(tokens)
    pos = torch.tensor([[3, 11], [0, 7]])
    part = model(tokens, logits_at=pos)
    assert part.shape == (2, 2, 512)
    ref = full.gather(1, pos[..., None].expand(-1, -1, 512))
    torch.testing.assert_close(part, ref)
    # the last block runs only at those positions: the gradients must not change either (fp64: exact)
    model = model.double()
    part, ref = model(tokens, logits_at=pos), model(tokens).gather(1, pos[..., None].expand(-1, -1, 512))
    last = model.layers[-1]
    params = [last.attention.wq.weight, last.attention.wk.weight, last.feed_forward.w2.weight,
              model.layers[0].attention.wv.weight]
    g_part = torch.autograd.grad(part.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g_part, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_attention_in_fp32_for_bf16_activations(autocast):
    """On a CPU, bf16 q, k, v (bf16 weights, or autocast's outputs) are attended in fp32 and the
    output cast back: torch's bf16 CPU attention is slower (prof.py), and fp32 is the reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                         enable_gqa=True).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = llama.attention(q, k, v, None, True, True)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert not torch.equal(bf16, ref)  # the kernels differ: the test can tell them apart
    x = torch.randn(2, 4, 16, 8, generator=g)  # fp32 is untouched
    assert torch.equal(llama.attention(x, x, x, None, True, False),
                       F.scaled_dot_product_attention(x, x, x, is_causal=True))


def test_autocast_casts_a_frozen_weight_once_and_anew_after_it_changes(monkeypatch):
    """Under autocast each frozen weight is cast once and kept (llama.autocast_weight: torch's
    autocast re-casts a weight that needs no grad in every forward); the loss and LoRA's gradients
    are exactly those of torch's autocast casting every time, also after an in-place change of a
    weight (LoRA's merge), and the head (the tied embedding) is cached too."""
    import abmll
    model = abmll.inject(tiny_model(), "lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    tokens = torch.randint(512, (2, 16), generator=torch.Generator().manual_seed(0))
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]

    def step(cached: bool):
        with monkeypatch.context() as m:
            if not cached:  # torch's autocast as it is: every weight cast in every forward
                m.setattr(llama, "autocast_weight", lambda owner, w, x: w)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1).float(),
                                       tokens[:, 1:].flatten())
        grads = torch.autograd.grad(loss, adapters, allow_unused=True)  # a merged layer's: None
        return [loss.detach(), *(torch.zeros(0) if g is None else g for g in grads)]

    def caches():
        return llama.kept_casts(model)

    ref, got = step(False), step(True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    first = caches()
    assert len(first) == 2 * 7 + 1 and all(w.dtype == torch.bfloat16 for w in first.values())
    step(True)
    assert all(caches()[n] is w for n, w in first.items())  # the same casts: none made again
    model.layers[0].attention.wq.merge()  # W0 += s B A in place
    ref2, got2 = step(False), step(True)
    assert not torch.equal(ref2[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(ref2, got2))
    with torch.no_grad():  # outside autocast, and for fp32 weights without it, nothing is cast
        assert torch.equal(model(tokens), model(tokens))
    assert llama.autocast_weight(model, first["layers.1.attention.wk"], tokens) is \
        first["layers.1.attention.wk"]


def test_kv_cache_matches_recompute():
    model = tiny_model(tie_embeddings=True)
    prompt = [5, 17, 300, 2, 99]
    out = model.generate(prompt, 8)
    ids = list(prompt)
    for _ in range(8):  # greedy by recomputing the whole sequence each step
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]
    # a multi-token chunk after a cached prefix uses the prefix-plus-causal mask
    model.setup_cache(1, 32)
    a = model(torch.tensor([ids[:6]]))
    b = model(torch.tensor([ids[6:10]]), start_pos=6)
    model.clear_cache()
    torch.testing.assert_close(torch.cat([a, b], 1), model(torch.tensor([ids[:10]])), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# parity with transformers


def hf_model(tie: bool, scaled: bool, kv_heads: int = 2, vocab: int = 300):
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaled:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, intermediate_size=192, vocab_size=vocab,
                                   max_position_embeddings=16384, rms_norm_eps=1e-5, rope_parameters=rope,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0, 0.08)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def hf_qk_to_meta(w, n_heads):
    """Invert transformers' own Meta->HF permutation numerically (an independent reference)."""
    rows = w.shape[0]
    hd = rows // n_heads
    # transformers' convert_llama_weights_to_hf.permute, applied to row indices
    idx = torch.arange(rows).view(n_heads, hd // 2, 2).transpose(1, 2).reshape(rows)
    meta = torch.empty_like(w)
    meta[idx] = w
    return meta


@pytest.mark.parametrize("tie,scaled,kv", [(False, False, 2), (True, True, 2), (False, True, 4), (True, False, 1)])
def test_hf_safetensors_logits_match_transformers(tmp_path, tie, scaled, kv):
    ref = hf_model(tie, scaled, kv)
    ref.save_pretrained(tmp_path)
    ours, tok = load(tmp_path)
    assert tok is None  # no tokenizer file written
    tokens = torch.randint(0, 300, (2, 40))
    diff = (ours(tokens) - hf_logits(ref, tokens)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("tie,scaled", [(False, True), (True, False)])
def test_meta_layout_logits_match_transformers(tmp_path, tie, scaled):
    ref = hf_model(tie, scaled)
    sd = ref.state_dict()
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not tie:
        meta["output.weight"] = sd["lm_head.weight"]
    for i in range(2):
        for hf, m in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = hf_qk_to_meta(w, 4)
            if hf == "self_attn.k_proj":
                w = hf_qk_to_meta(w, 2)
            meta[f"layers.{i}.{m}.weight"] = w.clone()
    torch.save(meta, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, ffn_dim_multiplier=None,
        norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=scaled)))
    ours, _ = load(tmp_path)
    tokens = torch.randint(0, 300, (2, 33))
    diff = (ours(tokens) - hf_logits(ref, tokens)).abs().max().item()
    assert diff < 1e-4, diff


def test_bf16_on_request(tmp_path):
    ref = hf_model(False, False)
    ref.save_pretrained(tmp_path)
    ours, _ = load(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    tokens = torch.randint(0, 300, (1, 16))
    assert (ours(tokens).float() - hf_logits(ref, tokens)).abs().max() < 0.1


# -----------------------------------------------------------------------------
# tokenizers


def train_hf_tokenizer(kind: str, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    tk_mod = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tk = tk_mod.Tokenizer(models.BPE())
    if kind == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif kind == "llama3":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tokenizer.LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return tk


@pytest.mark.parametrize("kind", ["smollm", "llama3", "gpt2"])
def test_hf_tokenizer_json_matches_tokenizers(tmp_path, kind):
    ref = train_hf_tokenizer(kind)
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf_json(tmp_path / "tokenizer.json", {"bos_token_id": 1, "eos_token_id": 2})
    for text in TEXTS + CORPUS[:4]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.chat_format == "chatml"
    # special-token strings inside user text are plain text, never control tokens
    assert 1 not in tok.encode("<|im_start|>")


def test_llama3_tiktoken_model_file_matches_tokenizers(tmp_path):
    ref = train_hf_tokenizer("llama3", specials=())
    dec = tokenizer._byte_decoder()
    lines = [f"{base64.b64encode(bytes(dec[c] for c in t)).decode()} {i}"
             for t, i in sorted(ref.get_vocab().items(), key=lambda kv: kv[1])]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = Tokenizer.from_model_file(tmp_path / "tokenizer.model")
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text).ids, text
    n = len(lines)
    assert (tok.bos_id, tok.eos_id, tok.chat_format) == (n, n + 1, "llama3")
    sp = tok.specials
    hello = tok.encode("hi")
    expected = ([n, sp["<|start_header_id|>"]] + tok.encode("user") + [sp["<|end_header_id|>"]] + tok.encode("\n\n")
                + hello + [sp["<|eot_id|>"], sp["<|start_header_id|>"]] + tok.encode("assistant")
                + [sp["<|end_header_id|>"]] + tok.encode("\n\n"))
    assert tok.encode_chat("  hi ") == expected
    assert sp["<|eot_id|>"] in tok.stop_ids


def test_sentencepiece_tokenizer_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    os.replace(tmp_path / "sp.model", tmp_path / "tokenizer.model")
    tok = Tokenizer.from_model_file(tmp_path / "tokenizer.model")
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
    assert tok.encode_chat("hi") == [ref.bos_id()] + ref.encode("[INST] hi [/INST]")
    assert tok.chat_format == "llama2"


# -----------------------------------------------------------------------------
# GGUF


def write_gguf(path, ref, hf_tok, quant=None, arch="llama", head_count=None):
    gguf = pytest.importorskip("gguf")
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads if head_count is None else head_count)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(hf_tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    merges = json.loads(hf_tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "down_proj": "ffn_down",
             "up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in ref.state_dict().items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        elif key.startswith("model.layers."):
            _, _, i, *rest = key.split(".")
            name = f"blk.{i}.{names[rest[-2]]}.weight"
        else:
            name = f"{names[key.split('.')[1]]}.weight"
        t = t.clone()
        if name.endswith("attn_q.weight"):  # llama.cpp stores q/k in Meta's interleaved layout
            t = hf_qk_to_meta(t, cfg.num_attention_heads)
        if name.endswith("attn_k.weight"):
            t = hf_qk_to_meta(t, cfg.num_key_value_heads)
        arr = t.numpy().astype(np.float32)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("quant", [None, "Q8_0"])
def test_gguf_logits_match_transformers_gguf_loader(tmp_path, quant):
    gguf = pytest.importorskip("gguf")
    hf_tok = train_hf_tokenizer("smollm")
    ref = hf_model(tie=True, scaled=False, kv_heads=2, vocab=hf_tok.get_vocab_size())
    q = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    write_gguf(tmp_path / "tiny.gguf", ref, hf_tok, q)
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours, tok = load(tmp_path / "tiny.gguf")
    tokens = torch.randint(0, hf_tok.get_vocab_size(), (2, 30))
    diff = (ours(tokens) - hf_logits(theirs, tokens)).abs().max().item()
    assert diff < 1e-4, diff
    if quant is None:  # unquantized: equal to the original safetensors model too
        assert (ours(tokens) - hf_logits(ref, tokens)).abs().max().item() < 1e-4
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text).ids


def smollm_path():
    import fetch

    p = fetch.cache_dir() / "files" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        pytest.skip("smollm2-135m is not cached (python fetch.py smollm2-135m)")
    return p


def test_smollm2_gguf_matches_transformers():
    p = smollm_path()
    transformers = pytest.importorskip("transformers")
    ours, tok = load(p)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    htok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    # transformers' GGUF conversion drops the digit splitting that SmolLM2's own tokenizer.json
    # has (Digits(individual_digits) then ByteLevel); put it back to get the real reference
    from tokenizers import pre_tokenizers

    htok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS:
        assert tok.encode(text) == htok.encode(text, add_special_tokens=False), text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    ref_ids = htok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert tok.encode_chat("What is 2+2?", system="Be brief.") == list(ref_ids)
    tokens = torch.tensor([tok.encode_chat("What is the capital of France?")])
    assert (ours(tokens) - hf_logits(theirs, tokens)).abs().max().item() < 1e-4


# -----------------------------------------------------------------------------
# bad input: one line naming the file, non-zero exit, never a traceback


def run_cli(path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["llama.py", str(path), "--prompt", "hi"])
    with pytest.raises(SystemExit) as e:
        llama.main()
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg
    return msg


def test_bad_inputs_end_in_one_line(tmp_path, capsys, monkeypatch):
    cases = {}
    cases["missing"] = tmp_path / "nope"
    (tmp_path / "empty").mkdir()
    cases["empty dir"] = tmp_path / "empty"
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    cases["random bytes"] = tmp_path / "random.bin"
    (tmp_path / "notes.txt").write_text("hello")
    cases["unknown"] = tmp_path / "notes.txt"
    (tmp_path / "trunc.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(20))
    cases["truncated gguf"] = tmp_path / "trunc.gguf"
    hf_tok = train_hf_tokenizer("smollm")
    ref = hf_model(tie=True, scaled=False, vocab=hf_tok.get_vocab_size())
    write_gguf(tmp_path / "other.gguf", ref, hf_tok, arch="gpt2")
    cases["non-llama gguf"] = tmp_path / "other.gguf"
    good = tmp_path / "good.gguf"
    write_gguf(good, ref, hf_tok)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["gguf cut in half"] = tmp_path / "cut.gguf"
    hf = tmp_path / "hf"
    ref.save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    (tmp_path / "hf_nokeys").mkdir()
    (tmp_path / "hf_nokeys" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    cases["config.json missing keys"] = tmp_path / "hf_nokeys"
    (tmp_path / "hf_shape").mkdir()
    os.link(hf / "model.safetensors", tmp_path / "hf_shape" / "model.safetensors")
    (tmp_path / "hf_shape" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 160}))
    cases["shape mismatch"] = tmp_path / "hf_shape"
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps({"dim": 64}))
    cases["params.json missing keys"] = tmp_path / "meta"
    (tmp_path / "meta2").mkdir()
    (tmp_path / "meta2" / "params.json").write_text(json.dumps(dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, norm_eps=1e-5)))
    (tmp_path / "meta2" / "consolidated.00.pth").write_bytes(os.urandom(100))
    cases["corrupt pth"] = tmp_path / "meta2"
    for what, path in cases.items():
        msg = run_cli(path, capsys, monkeypatch)
        assert path.name in msg, (what, msg)
    assert "missing keys hidden_size" in run_cli(tmp_path / "hf_nokeys", capsys, monkeypatch)
    assert "'gpt2'" in run_cli(tmp_path / "other.gguf", capsys, monkeypatch)
    assert "shape" in run_cli(tmp_path / "hf_shape", capsys, monkeypatch)


def test_cli_exit_status_nonzero(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "llama.py"), str(tmp_path / "missing"), "--prompt", "x"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_config_fields_are_type_and_range_checked_naming_the_key(tmp_path, capsys, monkeypatch):
    """Numbers given as strings, a boolean given as a string (read as true, it dropped the real output
    head), zero heads, a dim that heads do not split: one line naming the file and its key."""
    hf_tok = train_hf_tokenizer("smollm")
    ref = hf_model(tie=False, scaled=False, vocab=hf_tok.get_vocab_size())
    hf = tmp_path / "hf"
    ref.save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    cases = {"hf_str": ({"hidden_size": "64"}, "config.json: hidden_size must be a positive integer, got \"64\""),
             "hf_tie": ({"tie_word_embeddings": "false"}, "config.json: tie_word_embeddings must be true or false"),
             "hf_heads0": ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
             "hf_split": ({"num_attention_heads": 5}, "hidden_size 64 does not split into num_attention_heads 5"),
             "hf_kv": ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
             "hf_eps": ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a positive number"),
             "hf_rope": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
             "hf_list": (None, "config.json: expected a JSON object")}
    for name, (change, needle) in cases.items():
        (tmp_path / name).mkdir()
        os.link(hf / "model.safetensors", tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps([cfg] if change is None else {**cfg, **change}))
        msg = run_cli(tmp_path / name, capsys, monkeypatch)
        assert needle in msg and name in msg, (name, msg)
    meta = dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, norm_eps=1e-5)
    for name, change, needle in (("meta_str", {"n_layers": "2"}, "params.json: n_layers must be a positive integer"),
                                 ("meta_split", {"n_heads": 6}, "params.json: dim 64 does not split into n_heads 6"),
                                 ("meta_scaled", {"use_scaled_rope": 1}, "use_scaled_rope must be true or false")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.json").write_text(json.dumps({**meta, **change}))
        torch.save({}, tmp_path / name / "consolidated.00.pth")
        msg = run_cli(tmp_path / name, capsys, monkeypatch)
        assert needle in msg, (name, msg)
    tied = hf_model(tie=True, scaled=False, vocab=hf_tok.get_vocab_size())
    write_gguf(tmp_path / "heads0.gguf", tied, hf_tok, head_count=0)
    msg = run_cli(tmp_path / "heads0.gguf", capsys, monkeypatch)
    assert "heads0.gguf: llama.attention.head_count must be a positive integer, got 0" in msg, msg
