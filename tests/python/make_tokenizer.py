"""Trains a small byte-level BPE tokenizer with Hugging Face `tokenizers` for Kiln's
tokenizer.json test (tests/tokenizers.rs).

  make_tokenizer.py TEXT_FILE OUT_DIR

Writes OUT_DIR/tokenizer.json and OUT_DIR/expected.json: the ids of TEXT_FILE's content,
as `tokenizers` encodes it, and the id of <|endoftext|>.
"""
import json
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

text_file, out = sys.argv[1:3]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"])
tok.train([text_file], trainer)
tok.save(f"{out}/tokenizer.json")
text = open(text_file, encoding="utf-8", errors="replace").read()
json.dump(
    {
        "ids": tok.encode(text, add_special_tokens=False).ids,
        "eos": tok.token_to_id("<|endoftext|>"),
        "vocab": tok.get_vocab_size(with_added_tokens=True),
    },
    open(f"{out}/expected.json", "w"),
)
