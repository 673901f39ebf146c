"""Encoder throughput of PyTorch on a GPU, for benches/gpu/gpu-bench.sh.

Runs the dense checkpoint that `examples/export.rs` writes (the same weights themescan runs)
through transformers' BertModel with SDPA attention, in fp32 or bf16, on the texts of a JSONL
file. Texts get the e5 "passage: " prefix and are cut to 512 tokens (as themescan's first
window); batches are sorted by length and padded to their longest, under a padded-token budget.
Prints one line: `torch <dtype> <tokens> tokens <seconds> s <tokens/s> tokens/s`.
"""
import argparse
import json
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    texts = []
    with open(args.input, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append("passage: " + json.loads(line)["text"])
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    ids = [e.ids[:512] for e in tok.encode_batch(texts)]
    for seq in ids:
        if len(seq) == 512:
            seq[-1] = 2  # keep the closing special token of a cut text
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches, cur = [], []
    for i in order:
        longest = len(ids[cur[0]]) if cur else len(ids[i])
        if cur and (len(cur) + 1) * longest > args.batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModel.from_pretrained(args.model, attn_implementation="sdpa", torch_dtype=dtype)
    model = model.cuda().eval()
    tensors = []
    for b in batches:
        longest = len(ids[b[0]])
        x = torch.ones((len(b), longest), dtype=torch.long)
        m = torch.zeros((len(b), longest), dtype=torch.long)
        for r, i in enumerate(b):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            m[r, : len(ids[i])] = 1
        tensors.append((x.cuda(), m.cuda()))
    tokens = sum(len(s) for s in ids)

    def run():
        with torch.inference_mode():
            for x, m in tensors:
                h = model(input_ids=x, attention_mask=m).last_hidden_state
                pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
                torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        torch.cuda.synchronize()

    run()  # warm-up: kernels, allocator
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    secs = sorted(times)[len(times) // 2]
    print(f"torch {args.dtype} {tokens} tokens {secs:.3f} s {tokens / secs:.0f} tokens/s")


if __name__ == "__main__":
    main()
