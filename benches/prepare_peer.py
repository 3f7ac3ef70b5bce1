"""The peer of benches/prepare.sh: the same work as `kiln prepare` on a Parquet corpus, done
the way Python preprocessing scripts do it: pyarrow reads the `text` column a batch at a
time, tiktoken's `encode_ordinary_batch` encodes it (GPT-2, built from the ranks Kiln
embeds), the end-of-text id is appended, and pyarrow writes `doc_id` + `tokens`
(list<int32>, zstd) shards of about 100M tokens.

  prepare_peer.py RANKS_FILE CORPUS_DIR OUT_DIR THREADS

Prints one JSON line: documents, tokens, seconds.
"""
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenize_peers import ENDOFTEXT, R50K_PATTERN, read_ranks  # noqa: E402

ranks_path, corpus, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ranks, _ = read_ranks(ranks_path)
eot = len(ranks)
enc = tiktoken.Encoding("r50k_base", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                        special_tokens={ENDOFTEXT: eot}, explicit_n_vocab=eot + 1)
schema = pa.schema([("doc_id", pa.int64(), False),
                    ("tokens", pa.list_(pa.field("item", pa.int32(), False)), False)])
os.makedirs(out, exist_ok=True)
start = time.perf_counter()
documents = tokens = 0
shard, shard_tokens, writer = 0, 0, None
for name in sorted(os.listdir(corpus)):
    if not name.endswith(".parquet"):
        continue
    for batch in pq.ParquetFile(os.path.join(corpus, name)).iter_batches(columns=["text"], batch_size=8192):
        ids = enc.encode_ordinary_batch(batch.column(0).to_pylist(), num_threads=threads)
        for doc in ids:
            doc.append(eot)
        if writer is None:
            writer = pq.ParquetWriter(os.path.join(out, f"train-{shard:05d}.parquet"), schema, compression="zstd")
        table = pa.table({"doc_id": pa.array(range(documents, documents + len(ids)), pa.int64()),
                          "tokens": pa.array(ids, pa.list_(pa.field("item", pa.int32(), False)))},
                         schema=schema)
        writer.write_table(table)
        n = sum(len(d) for d in ids)
        documents += len(ids)
        tokens += n
        shard_tokens += n
        if shard_tokens >= 100_000_000:
            writer.close()
            writer, shard, shard_tokens = None, shard + 1, 0
if writer is not None:
    writer.close()
print(json.dumps({"documents": documents, "tokens": tokens, "seconds": time.perf_counter() - start}))
