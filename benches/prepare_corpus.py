"""Writes a Parquet corpus of about SIZE_MB megabytes of text in FineWeb's layout (a `text`
column beside `id`, `url` and `token_count`; snappy; 8 files of row groups of 10,000 rows)
from the Shakespeare plays: paragraphs shuffled with a fixed seed and joined into documents
of 1-6 KB, so the text is real English and no two documents are alike in order.

  prepare_corpus.py PLAYS_DIR OUT_DIR [SIZE_MB]
"""
import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

plays, out = sys.argv[1], sys.argv[2]
size = int(float(sys.argv[3] if len(sys.argv) > 3 else 1000) * 1e6)
paragraphs = []
for name in sorted(os.listdir(plays)):
    if name.endswith("_gut.txt"):
        with open(os.path.join(plays, name), encoding="utf-8", errors="replace") as f:
            paragraphs += [p.strip() for p in f.read().split("\n\n") if p.strip()]
rng = random.Random(0)
os.makedirs(out, exist_ok=True)
files = 8
per_file = size // files
n = 0
for i in range(files):
    texts, written = [], 0
    while written < per_file:
        target = rng.randint(1000, 6000)
        doc = []
        length = 0
        while length < target:
            p = paragraphs[rng.randrange(len(paragraphs))]
            doc.append(p)
            length += len(p) + 2
        text = "\n\n".join(doc)
        texts.append(text)
        written += len(text.encode())
    table = pa.table(
        {
            "id": pa.array([f"<urn:uuid:{n + j:012d}>" for j in range(len(texts))]),
            "text": pa.array(texts, type=pa.string()),
            "url": pa.array([f"https://example.org/{n + j}" for j in range(len(texts))]),
            "token_count": pa.array([len(t) // 4 for t in texts], type=pa.int64()),
        }
    )
    n += len(texts)
    pq.write_table(table, f"{out}/{i:03d}_00000.parquet", compression="snappy", row_group_size=10_000)
print(f"{n} documents, {sum(os.path.getsize(f'{out}/{f}') for f in os.listdir(out)) / 1e6:.0f} MB of Parquet")
