#!/usr/bin/env python3
"""Write Python's pydoc topics (about 1 MB of English reference prose that ships with
every Python 3) to data/corpus/pydoc_topics.txt, one topic after another, paragraphs
separated by blank lines, so that saepipe's `.txt` reader (one document per paragraph)
can use it as a local corpus without the hub (pipeline.md §5).

Usage: python3 scripts/extract_pydoc_corpus.py [OUT]
"""
import os
import sys

import pydoc_data.topics as topics

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("data", "corpus", "pydoc_topics.txt")
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
tmp = out + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    for name in sorted(topics.topics):
        text = topics.topics[name].replace("\r\n", "\n").strip()
        f.write(text)
        f.write("\n\n")
os.replace(tmp, out)
print(f"wrote {out} ({os.path.getsize(out)} bytes, {len(topics.topics)} topics) from {topics.__file__}")
