"""Reference side of Kiln's Hugging Face parity tests (run by tests/hf_parity.rs).

  hf_llama.py make CONFIG_JSON OUT_DIR   build a seeded LlamaForCausalLM from a config
                                         and save it (safetensors) to OUT_DIR
  hf_llama.py logits MODEL_DIR OUT_FILE  load MODEL_DIR with transformers and write the
                                         logits and loss on fixed token ids to OUT_FILE

Both write OUT_DIR/reference.safetensors or OUT_FILE holding `input_ids` (int64, [2, 17]),
`logits` (float32) and `loss` (float32, next-token cross-entropy), computed with the eager
attention implementation in float32.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM


def reference(model, path):
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 17), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    save_file(
        {
            "input_ids": ids.contiguous(),
            "logits": out.logits.float().contiguous(),
            "loss": out.loss.float().reshape(1),
        },
        path,
    )


def main():
    mode, src, dst = sys.argv[1:4]
    torch.manual_seed(0)
    if mode == "make":
        config = LlamaConfig(**json.load(open(src)))
        config._attn_implementation = "eager"
        model = LlamaForCausalLM(config).float().eval()
        # Norm gains start at 1; perturb them so a swapped or ignored gain shows.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(dst, safe_serialization=True)
        reference(model, os.path.join(dst, "reference.safetensors"))
    elif mode == "logits":
        model = LlamaForCausalLM.from_pretrained(
            src, torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        reference(model, dst)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
