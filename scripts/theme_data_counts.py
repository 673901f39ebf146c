#!/usr/bin/env python3
"""Counts of the theme data per language: texts, labels, kinds, words, contrastive stories.

    python3 scripts/theme_data_counts.py training-data/themes > training-data/themes/COUNTS.md
"""
import collections
import glob
import json
import os
import sys

THEMES = ["recruitment", "takedown", "foreign_interference", "financing"]


def main(folder):
    rows = collections.defaultdict(collections.Counter)
    stories = collections.defaultdict(lambda: collections.defaultdict(set))
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: {e}")
                lang = d.get("lang", "?")
                c = rows[lang]
                c["texts"] += 1
                for t in d["labels"]:
                    c[t] += 1
                if len(d["labels"]) > 1:
                    c["multi"] += 1
                kind = d.get("kind", "")
                if not d["labels"]:
                    c["near_miss" if kind == "near_miss" else "negative"] += 1
                words = len(d["text"].split())
                c["words"] += words
                c["long"] += words > 400
                stories[lang][d.get("story", d["id"])].add(tuple(sorted(d["labels"])))
    cols = ["texts", *THEMES, "multi", "near_miss", "negative", "long", "contrastive", "words"]
    print("| lang | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    total = collections.Counter()
    for lang in sorted(rows):
        c = rows[lang]
        c["contrastive"] = sum(1 for s in stories[lang].values() if len(s) > 1)
        total.update(c)
        print(f"| {lang} | " + " | ".join(str(c[k]) for k in cols) + " |")
    print("| **all** | " + " | ".join(str(total[k]) for k in cols) + " |")
    print()
    print(f"{len(rows)} languages. `long`: texts over 400 words; `contrastive`: stories told "
          "in variants with different labels.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "training-data/themes")
