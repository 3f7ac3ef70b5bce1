"""Writes a small pre-training corpus the way public ones are shaped, for Kiln's prepare
test (tests/prepare_corpus.rs).

  text_corpus.py SHAKESPEARE_DIR OUT_DIR

OUT_DIR/web/data/CC-1/000.parquet: a `text` column with `id`, `url` and `score` beside it,
snappy, 3 row groups (FineWeb's layout); OUT_DIR/web/data/CC-2/001.parquet: `text` as
large_string, zstd, 2 row groups; OUT_DIR/jsonl/a.jsonl.gz and b.jsonl.zst: one JSON object a
line with `text` and `source`; OUT_DIR/bad/null.parquet: a null text at row 5;
OUT_DIR/bad/int.parquet: an int64 `text` column. Documents are paragraphs of the plays.
OUT_DIR/expected.json: the good documents' texts, in the order Kiln reads the files.
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

plays, out = sys.argv[1], sys.argv[2]
paragraphs = []
for play in ["hamlet_gut.txt", "macbeth_gut.txt"]:
    with open(os.path.join(plays, play), encoding="utf-8", errors="replace") as f:
        paragraphs += [p.strip() for p in f.read().split("\n\n") if p.strip()]
chunks = [paragraphs[i::4] for i in range(4)]
for d in ["web/data/CC-1", "web/data/CC-2", "jsonl", "bad"]:
    os.makedirs(os.path.join(out, d), exist_ok=True)


def web(texts, string_type):
    return pa.table(
        {
            "id": pa.array([f"doc-{i}" for i in range(len(texts))]),
            "text": pa.array(texts, type=string_type),
            "url": pa.array([f"https://example.org/{i}" for i in range(len(texts))]),
            "score": pa.array([0.5 + i % 3 for i in range(len(texts))], type=pa.float64()),
        }
    )


t = web(chunks[0], pa.string())
pq.write_table(t, f"{out}/web/data/CC-1/000.parquet", compression="snappy",
               row_group_size=(len(chunks[0]) + 2) // 3)
t = web(chunks[1], pa.large_string())
pq.write_table(t, f"{out}/web/data/CC-2/001.parquet", compression="zstd",
               row_group_size=(len(chunks[1]) + 1) // 2)
for name, codec, texts in [("a.jsonl.gz", "gzip", chunks[2]), ("b.jsonl.zst", "zstd", chunks[3])]:
    with pa.CompressedOutputStream(f"{out}/jsonl/{name}", codec) as f:
        for t in texts:
            f.write((json.dumps({"source": "plays", "text": t}) + "\n").encode())

null_texts = chunks[0][:10]
null_texts[5] = None
pq.write_table(pa.table({"text": pa.array(null_texts, type=pa.string())}), f"{out}/bad/null.parquet")
pq.write_table(pa.table({"text": pa.array(list(range(10)), type=pa.int64())}), f"{out}/bad/int.parquet")

with open(f"{out}/expected.json", "w") as f:
    # Kiln sorts inputs by name: .../jsonl/a.jsonl.gz, .../jsonl/b.jsonl.zst, .../web/...
    json.dump(chunks[2] + chunks[3] + chunks[0] + chunks[1], f)
