"""The peer of benches/loader.rs: pyarrow reads the same shards row group by row group and
decodes the token lists into flat numpy arrays (the same decode work: decompression, list
offsets, values). Prints one JSON line.

  loader_pyarrow.py DIR|s3://bucket/prefix [THREADS=1]
"""
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

url = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
pa.set_cpu_count(threads)
pa.set_io_thread_count(max(threads, 1))
if url.startswith("s3://"):
    endpoint = os.environ["AWS_ENDPOINT"]
    filesystem = fs.S3FileSystem(
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=endpoint.split("://", 1)[1],
        scheme=endpoint.split("://", 1)[0],
        region="us-east-1",
    )
    base = url[len("s3://"):]
else:
    filesystem = fs.LocalFileSystem()
    base = os.path.abspath(url)
with filesystem.open_input_stream(f"{base}/manifest.json") as f:
    manifest = json.loads(f.read())
start = time.perf_counter()
tokens = 0
for shard in manifest["train"]["shards"]:
    pf = pq.ParquetFile(filesystem.open_input_file(f"{base}/{shard['path']}"))
    for rg in range(pf.num_row_groups):
        table = pf.read_row_group(rg, columns=["tokens"], use_threads=threads > 1)
        values = table.column("tokens").combine_chunks().flatten().to_numpy()
        tokens += len(values)
secs = time.perf_counter() - start
assert tokens == manifest["train"]["tokens"], (tokens, manifest["train"]["tokens"])
print(json.dumps({"system": "pyarrow", "url": url, "threads": threads, "tokens": tokens,
                  "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs),
                  "pyarrow": pa.__version__}))
