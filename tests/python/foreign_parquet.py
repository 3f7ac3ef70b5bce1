"""Writes token shards the way other tools do, for Kiln's foreign-Parquet test
(tests/foreign_parquet.rs): pyarrow with several list types, compressions and row groups.

  foreign_parquet.py OUT_DIR

OUT_DIR/good/: a-large_list_int64.parquet (gzip, 3 row groups), b-list_uint16.parquet
(snappy), c-list_uint32.parquet (zstd, 2 row groups), each with an `input_ids` column and
an unrelated `text` column; OUT_DIR/expected.json holds every file's tokens, concatenated
in file order. OUT_DIR/bad-type/ holds a `list<float>` column; OUT_DIR/bad-range/ a token
at the vocabulary size (1000).
"""
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

out = sys.argv[1]
rng = np.random.default_rng(0)
os.makedirs(f"{out}/good", exist_ok=True)
os.makedirs(f"{out}/bad-type", exist_ok=True)
os.makedirs(f"{out}/bad-range", exist_ok=True)


def docs(n):
    return [rng.integers(0, 1000, size=rng.integers(5, 400)).tolist() for _ in range(n)]


expected = []
specs = [
    ("a-large_list_int64.parquet", pa.large_list(pa.int64()), "gzip", 40),
    ("b-list_uint16.parquet", pa.list_(pa.uint16()), "snappy", 1000),
    ("c-list_uint32.parquet", pa.list_(pa.uint32()), "zstd", 60),
]
for name, typ, compression, rows_per_group in specs:
    d = docs(120)
    table = pa.table({
        "text": pa.array([f"doc {i}" for i in range(len(d))]),
        "input_ids": pa.array(d, type=typ),
    })
    pq.write_table(table, f"{out}/good/{name}", compression=compression,
                   row_group_size=rows_per_group)
    for doc in d:
        expected.extend(doc)
json.dump({"tokens": expected}, open(f"{out}/expected.json", "w"))

pq.write_table(pa.table({"input_ids": pa.array([[1.0, 2.0]], type=pa.list_(pa.float32()))}),
               f"{out}/bad-type/x.parquet")
pq.write_table(pa.table({"input_ids": pa.array([[1, 2, 1000]], type=pa.list_(pa.int32()))}),
               f"{out}/bad-range/x.parquet")
