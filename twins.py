"""The models a benchmark run compares, all on one set of weights: twins of our Transformer that
share its weight storages, each carrying one method's adapters (bench.py's jobs), twins on a bf16
copy of the frozen weights with the same fp32 adapters, and transformers' LlamaForCausalLM with
peft's LoRA on our weights (the reference), its q / k rows permuted to HF's RoPE layout.

    base = llama.random_model(llama.ModelArgs.from_name("tiny"))
    models = twins.ours(base, bf16_weights=True)     # job name -> model: lora_step, abmll_step, ...
    theirs = twins.hf_twin(base)                     # transformers' model, the same numbers
    peft_model = twins.peft_lora(twins.hf_twin(base))
"""

import torch

import abmll
import hf
import llama


def shared(model: llama.Transformer) -> llama.Transformer:
    """A second Transformer on the very same weight storages, for adapters of its own."""
    with torch.device("meta"):
        twin = llama.Transformer(model.args)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    twin.inv_freq = model.inv_freq
    return twin.eval()


def ours(base: llama.Transformer, bf16_weights: bool) -> dict[str, llama.Transformer]:
    """Job name -> a twin of base with that job's adapters: LoRA, ABMLL with weight noise, ABMLL
    with the authors' activation noise; with bf16_weights LoRA's and ABMLL's also on a bf16 copy
    of the frozen weights, their adapters (fp32) copied from the first two."""
    models = {"lora_step": abmll.inject(shared(base), "lora"),
              "abmll_step": abmll.inject(shared(base), "abmll"),
              "abmll_step_act": abmll.inject(shared(base), "abmll", noise="activation")}
    if bf16_weights:
        b16 = shared(base).to(torch.bfloat16)
        for name, method in (("lora_step_bf16w", "lora"), ("abmll_step_bf16w", "abmll")):
            models[name] = abmll.inject(shared(b16), method)
            src = abmll.adapter_params(models[f"{method}_step"])
            with torch.no_grad():
                for k, p in abmll.adapter_params(models[name]).items():
                    p.copy_(src[k])
    return models


def reference_available() -> bool:
    """Whether transformers and peft, a benchmark-only extra, are installed."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def hf_twin(model: llama.Transformer):
    """transformers' LlamaForCausalLM on our weights: q / k rows permuted to HF's RoPE layout
    (hf.convert), every other weight shared."""
    import transformers

    a = model.args
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": a.rope_scaling_factor,
                "low_freq_factor": a.rope_low_freq_factor,
                "high_freq_factor": a.rope_high_freq_factor,
                "original_max_position_embeddings": a.rope_original_max_seq_len}
    cfg = transformers.LlamaConfig(
        hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads or a.n_heads, intermediate_size=a.ffn_dim,
        vocab_size=a.vocab_size, max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps,
        rope_parameters=rope, tie_word_embeddings=a.tie_embeddings, attn_implementation="sdpa")
    state = dict(hf.convert(k, t, a, to_hf=True) for k, t in model.state_dict().items())
    if a.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(cfg)
    theirs.load_state_dict(state, strict=True, assign=True)
    with torch.device(model.inv_freq.device):  # its RoPE buffers were made on meta
        theirs.model.rotary_emb = type(theirs.model.rotary_emb)(cfg)
    return theirs.eval()


def peft_lora(model, rank: int = 8, alpha: int = 16):
    """peft's LoRA on a transformers model: our targets (q, v, o), rank and alpha."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "o_proj"],
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg).train()
