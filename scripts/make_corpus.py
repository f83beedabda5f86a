#!/usr/bin/env python3
"""Build the local English corpus used by the default pipeline (pipeline.md §5, §6).

No hub and no internet: the text comes from Python's own standard library, which every
machine with Python 3 has. Two sources, written as JSON Lines (one document per line,
field "text") to data/corpus/:

* pydoc_topics.jsonl — `pydoc_data.topics`, about 1 MB of English reference prose, one
  document per topic;
* stdlib_docstrings.jsonl — the module, class and function docstrings of the pure-Python
  standard library, one document per docstring of at least 100 characters.

Deterministic: files and docstrings are visited in sorted order, so the same Python
version gives the same bytes. Usage: python3 scripts/make_corpus.py [OUT_DIR]
"""
import ast
import json
import os
import sys
import sysconfig


def pydoc_topics():
    import pydoc_data.topics as t

    for name in sorted(t.topics):
        text = t.topics[name].strip()
        if text:
            yield text


def stdlib_docstrings(min_chars=100):
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__")
        )
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        yield doc.strip()


def write(path, docs):
    tmp = path + ".tmp"
    n = size = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            n += 1
            size += len(d)
    os.replace(tmp, path)
    print(f"{path}: {n} documents, {size / 1e6:.1f} M characters")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "data/corpus"
    os.makedirs(out, exist_ok=True)
    write(os.path.join(out, "pydoc_topics.jsonl"), pydoc_topics())
    write(os.path.join(out, "stdlib_docstrings.jsonl"), stdlib_docstrings())


if __name__ == "__main__":
    main()
