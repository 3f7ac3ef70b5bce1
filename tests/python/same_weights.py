"""Loads two Hugging Face Llama directories with transformers and checks that they hold the
same weights exactly (the second cast to the first's dtype) and, in fp32, the same logits.

    python same_weights.py EXPORTED REFERENCE
"""
import sys

import torch
from transformers import LlamaForCausalLM

exported = LlamaForCausalLM.from_pretrained(sys.argv[1], torch_dtype="auto")
reference = LlamaForCausalLM.from_pretrained(sys.argv[2], torch_dtype=torch.float32)
reference = reference.to(exported.dtype)
a, b = exported.state_dict(), reference.state_dict()
assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))
for name in a:
    assert torch.equal(a[name], b[name]), f"{name} differs"
if exported.dtype == torch.float32:
    # (A model cast with .to() also casts its rotary buffers; one loaded in bf16 keeps them in
    # fp32, so bf16 logits are compared through the weights alone.)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
print(f"{sys.argv[1]}: {len(a)} tensors in {exported.dtype}, identical to {sys.argv[2]}")
