"""Meta <-> Hugging Face / PEFT names: one table, both directions, one permute.

The shape of gpt-fast's scripts/convert_hf_checkpoint.py: a literal `WEIGHT_MAP` from
transformers' LlamaForCausalLM names to Meta's (llama3's model.py, ours) and a small `permute`
for the q / k rows. `convert` reads both forwards (loaders.py loading an HF checkpoint) and
backwards (our adapters exported for peft, bench.py's transformers twin):

    llama.load("SmolLM2-135M-Instruct") # each HF weight through convert(key, w, args)
    abmll.save_peft(model, "adapter")   # collects each adapted layer's (B, A), calls write_peft
    peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(...), "adapter")

This module imports nothing from the rest of the library.
"""

import json
import re
from pathlib import Path

from safetensors.torch import save_file

# transformers' name -> Meta's; {} is the layer number
WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
TO_HF = {meta: hf for hf, meta in WEIGHT_MAP.items()}


def permute(w, n_heads: int, to_hf: bool = False):
    """q / k rows from HF's RoPE layout into Meta's; with to_hf, back. Per head, HF stores the
    first halves of the rotated pairs, then the second halves; Meta interleaves the pairs."""
    rows, cols = w.shape
    pairs = rows // n_heads // 2
    w = w.view(n_heads, pairs, 2, cols) if to_hf else w.view(n_heads, 2, pairs, cols)
    return w.transpose(1, 2).reshape(rows, cols)  # (heads, 2, pairs) <-> (heads, pairs, 2)


def convert(key: str, w, args, to_hf: bool = False):
    """One weight into the other naming -> (its name there, w with q / k rows permuted).

    The name is None where WEIGHT_MAP lacks the key. `args` is the model's llama.ModelArgs.
    """
    layer = re.search(r"\.(\d+)\.", key)
    template = key if layer is None else key.replace(layer.group(0), ".{}.", 1)
    name = (TO_HF if to_hf else WEIGHT_MAP).get(template)
    if name is None:
        return None, w
    heads = {"layers.{}.attention.wq.weight": args.n_heads,
             "layers.{}.attention.wk.weight": args.n_kv_heads or args.n_heads}
    meta = template if to_hf else name
    if meta in heads:
        w = permute(w, heads[meta], to_hf)
    return name.format(layer.group(1) if layer else ""), w


def write_peft(out_dir, factors: dict, args, rank: int, alpha: float):
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the matching
    transformers LlamaForCausalLM. `factors` maps Meta module names (layers.N.attention.wq) to
    their (B, A); `args` is the model's llama.ModelArgs. B's wq / wk rows are permuted to HF's RoPE
    layout (A's columns are the input's, which RoPE does not touch)."""
    state, targets = {}, set()
    for name, (B, A) in factors.items():
        key, B = convert(f"{name}.weight", B, args, to_hf=True)
        module = key.removesuffix(".weight")  # model.layers.N.self_attn.q_proj
        state[f"base_model.model.{module}.lora_A.weight"] = A.detach().float().contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = B.detach().float().contiguous()
        targets.add(module.rpartition(".")[2])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
