"""The peers of benches/tokenize.rs: OpenAI's `tiktoken` and Hugging Face `tokenizers`
encoding the same documents with the same GPT-2 vocabulary, built offline from the ranks
Kiln embeds (written by `tokenize --write-ranks`). Every run also checks its ids against
Kiln's, document by document.

  tokenize_peers.py build RANKS OUT_DIR
      checks RANKS against OpenAI's published r50k_base hash and writes
      OUT_DIR/tokenizer.json: byte-level BPE with the vocabulary mapped through GPT-2's
      byte-to-unicode table and one merge per token, the split tiktoken's BPE reaches with
      the lower ranks.
  tokenize_peers.py measure tiktoken|hf THREADS CORPUS RANKS TOKENIZER_JSON KILN_IDS|- [ROUNDS=1]
      encodes CORPUS (JSON lines {"text": ...}) ROUNDS times and prints one JSON line with the
      median time and, unless KILN_IDS is -, whether every id equals Kiln's.
  tokenize_peers.py summarize RESULTS COMMAND
      prints a table of the runs in RESULTS (the median of each tool's runs at each thread
      count), a summary JSON line and a Markdown row.
"""
import base64
import hashlib
import json
import os
import statistics
import sys
import time

# sha256 of https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken, as
# tiktoken_ext/openai_public.py checks it.
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
SEPARATOR = 0xFFFFFFFF  # ends each document in Kiln's ids file


def read_ranks(path):
    data = open(path, "rb").read()
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks, hashlib.sha256(data).hexdigest()


def bytes_to_unicode():
    """GPT-2's table: printable bytes stand for themselves, the others for code points 256+."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def bpe(ranks, token, max_rank):
    """tiktoken's BPE of `token` using only ranks below `max_rank`: repeatedly merge the
    adjacent pair whose concatenation has the lowest rank, leftmost first."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def build(ranks_path, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ranks, sha = read_ranks(ranks_path)
    if sha != R50K_SHA256:
        sys.exit(f"{ranks_path} is not OpenAI's r50k_base (sha256 {sha}, expected {R50K_SHA256})")
    b2u = bytes_to_unicode()
    unicode = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {unicode(t): r for t, r in ranks.items()}
    # In the vocabulary so the sizes agree, not an added token: encode_ordinary never
    # produces it, and the byte-level pre-tokenizer never yields it as one piece.
    vocab[ENDOFTEXT] = len(ranks)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = bpe(ranks, token, rank)
        if len(parts) != 2:
            sys.exit(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens: {parts}")
        merges.append((unicode(parts[0]), unicode(parts[1])))
    # ignore_merges: a piece that is itself a token is that token, as in tiktoken.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    os.makedirs(out, exist_ok=True)
    tok.save(f"{out}/tokenizer.json")
    print(json.dumps({"built": f"{out}/tokenizer.json", "vocab": len(vocab), "merges": len(merges),
                      "ranks_sha256_is_openai_r50k": True}))


def load_corpus(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def kiln_ids(path):
    import numpy as np

    flat = np.fromfile(path, dtype="<u4")
    ends = np.flatnonzero(flat == SEPARATOR)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [flat[s:e] for s, e in zip(starts, ends)]


def compare(kiln, peer, docs, token_bytes):
    """The documents whose ids differ from Kiln's, and where the first one starts to differ."""
    import numpy as np

    if len(kiln) != len(peer):
        return len(docs), {"error": f"Kiln encoded {len(kiln)} documents, the peer {len(peer)}"}
    bad, first = 0, None
    for d, (k, p) in enumerate(zip(kiln, peer)):
        p = np.asarray(p, dtype=np.uint32)
        if len(k) == len(p) and np.array_equal(k, p):
            continue
        bad += 1
        if first is None:
            n = min(len(k), len(p))
            i = int(np.argmax(k[:n] != p[:n])) if np.any(k[:n] != p[:n]) else n
            offset = len(b"".join(token_bytes(int(t)) for t in k[:i]))
            text = docs[d].encode("utf-8")
            first = {
                "doc": d, "token": i, "byte": offset,
                "text": text[max(0, offset - 40):offset + 40].decode("utf-8", "replace"),
                "kiln": [(int(t), token_bytes(int(t)).decode("utf-8", "replace")) for t in k[i:i + 6]],
                "peer": [(int(t), token_bytes(int(t)).decode("utf-8", "replace")) for t in p[i:i + 6]],
            }
    return bad, first


def measure(tool, threads, corpus, ranks_path, tokenizer_json, ids_path, rounds="1"):
    threads = int(threads)
    # Read when the tokenizers library first runs in parallel, so set before it is imported.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    import tiktoken

    docs = load_corpus(corpus)
    ranks, _ = read_ranks(ranks_path)
    enc = tiktoken.Encoding("r50k_base", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)
    if tool == "tiktoken":
        version = tiktoken.__version__

        def encode():
            return enc.encode_ordinary_batch(docs, num_threads=threads)

        def ids(out):
            return out
    elif tool == "hf":
        import tokenizers

        version = tokenizers.__version__
        tok = tokenizers.Tokenizer.from_file(tokenizer_json)

        def encode():
            return tok.encode_batch(docs, add_special_tokens=False)

        def ids(out):
            return [e.ids for e in out]
    else:
        sys.exit(f"unknown tool {tool!r}: expected tiktoken or hf")

    seconds = []
    out = None
    for _ in range(int(rounds)):
        out = None  # free the previous round's output outside the timed call
        start = time.perf_counter()
        out = encode()
        seconds.append(time.perf_counter() - start)
    out = ids(out)
    tokens = sum(len(x) for x in out)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    bad, first = None, None
    if ids_path != "-":
        bad, first = compare(kiln_ids(ids_path), out, docs, enc.decode_single_token_bytes)
    secs = statistics.median(seconds)
    print(json.dumps({
        "system": tool, "threads": threads, "docs": len(docs), "bytes": nbytes, "tokens": tokens,
        "seconds": round(secs, 4), "rounds_s": [round(s, 4) for s in seconds],
        "tokens_per_s": round(tokens / secs), "mb_per_s": round(nbytes / secs / 1e6, 3),
        "same_ids_as_kiln": None if bad is None else bad == 0, "mismatched_docs": bad,
        "first_mismatch": first,
        "version": version,
    }))


def summarize(results, command):
    runs = [json.loads(line) for line in open(results) if line.startswith("{")]
    groups = {}
    for r in runs:
        groups.setdefault((r["system"], r["threads"]), []).append(r)
    by = {}
    for key, rs in groups.items():
        secs = statistics.median(r["seconds"] for r in rs)
        checked = [r["same_ids_as_kiln"] for r in rs if r.get("same_ids_as_kiln") is not None]
        by[key] = dict(rs[0], seconds=secs, runs_s=[r["seconds"] for r in rs],
                       tokens_per_s=rs[0]["tokens"] / secs, mb_per_s=rs[0]["bytes"] / secs / 1e6,
                       checked=bool(checked), same=all(checked),
                       first_mismatch=next((r["first_mismatch"] for r in rs if r.get("first_mismatch")), None))
    peers = ["tiktoken", "hf"]
    names = {"kiln": "Kiln", "tiktoken": "tiktoken (Python)", "hf": "HF tokenizers (Python)"}
    cores = sorted({t for _, t in by})
    kiln1 = by[("kiln", 1)]
    print(f"{kiln1['docs']} documents, {kiln1['bytes'] / 1e6:.1f} MB, {kiln1['tokens']:,} tokens; "
          f"median of {len(kiln1['runs_s'])} runs each, alternating")
    print(f"{'tool':<24} {'cores':>5} {'tokens/s':>12} {'MB/s':>8} {'tokens/s/core':>14} {'ids':>10}")
    for system in ["kiln"] + peers:
        for threads in cores:
            r = by[(system, threads)]
            ids = "Kiln's" if system == "kiln" else (
                "identical" if r["checked"] and r["same"] else "DIFFER" if r["checked"] else "unchecked")
            print(f"{names[system]:<24} {threads:>5} {r['tokens_per_s']:>12,.0f} {r['mb_per_s']:>8.2f} "
                  f"{r['tokens_per_s'] / threads:>14,.0f} {ids:>10}")
    for threads in cores:
        ratios = ", ".join(
            f"{by[('kiln', threads)]['tokens_per_s'] / by[(s, threads)]['tokens_per_s']:.2f}x {s}" for s in peers)
        print(f"Kiln / peer, per core, on {threads} core{'s' if threads > 1 else ''}: {ratios}")
    for system in ["kiln"] + peers:
        scale = by[(system, cores[-1])]["tokens_per_s"] / by[(system, 1)]["tokens_per_s"]
        print(f"{names[system]}: {cores[-1]} cores give {scale:.2f}x one core")
    mismatches = {f"{s}@{t}": r["first_mismatch"] for (s, t), r in by.items()
                  if s != "kiln" and not (r["checked"] and r["same"])}
    same = not mismatches and all(r["tokens"] == kiln1["tokens"] for r in runs)
    for k, v in mismatches.items():
        print(f"ids not Kiln's in {k}: first difference {json.dumps(v)}")
    print(json.dumps({"summary": {"same_ids": same, "tokens": kiln1["tokens"], "bytes": kiln1["bytes"],
                                  "docs": kiln1["docs"], "mismatches": mismatches}}))
    meta = json.load(open(os.path.join(os.path.dirname(results), "meta.json")))
    m = lambda s, t: f"{by[(s, t)]['tokens_per_s'] / 1e6:.2f}M ({by[(s, t)]['mb_per_s']:.1f} MB/s)"  # noqa: E731
    ratio = lambda t: by[("kiln", t)]["tokens_per_s"] / max(by[(s, t)]["tokens_per_s"] for s in peers)  # noqa: E731
    print(f"| {meta['date']} | {meta['machine']} | `{command}` | {kiln1['bytes'] / 1e6:.1f} MB, "
          f"{kiln1['tokens'] / 1e6:.2f}M tokens | {m('kiln', 1)} | {m('kiln', cores[-1])} | "
          f"{m('tiktoken', 1)} | {m('tiktoken', cores[-1])} | {m('hf', 1)} | {m('hf', cores[-1])} | "
          f"{ratio(1):.2f}x, {ratio(cores[-1]):.2f}x | {'identical' if same else 'DIFFER'} |")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "build":
        build(*args)
    elif cmd == "measure":
        measure(*args)
    elif cmd == "summarize":
        summarize(*args)
    else:
        sys.exit(f"unknown command {cmd!r}: expected build, measure or summarize")
