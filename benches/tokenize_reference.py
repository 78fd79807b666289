"""The tokenize operator's template and truncation written again in Python over Hugging
Face `tokenizers` (fast, batched): the side-by-side benchmark, and the generator of the
expected ids in tests/fixtures/tokenize/expected.json.

    .venv-bench/bin/python benches/tokenize_reference.py bench --tokenizer T.json --template blackpearl --rows 20000
    .venv-bench/bin/python benches/tokenize_reference.py fixture
"""

import argparse
import csv
import json
import os
import sys
import time

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def read_template(name_or_path):
    path = name_or_path
    if os.sep not in name_or_path and not name_or_path.endswith(".txt"):
        path = os.path.join(ROOT, "plans", "templates", name_or_path + ".txt")
    text = open(path, encoding="utf-8").read()
    header, body = text.split("\n---\n", 1)
    if body.endswith("\n"):
        body = body[:-1]
    settings = {}
    for line in header.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k, v = line.split("=", 1)
        settings[k.strip()] = json.loads(v.strip())
    pieces, rest = [], body
    slots = ["{prompt}", "{response_a}", "{response_b}"]
    while True:
        found = [(rest.find(s), s) for s in slots if rest.find(s) >= 0]
        if not found:
            if rest:
                pieces.append(("text", rest))
            break
        at, slot = min(found)
        if at:
            pieces.append(("text", rest[:at]))
        pieces.append(("slot", slot[1:-1]))
        rest = rest[at + len(slot):]
    return settings, pieces


class Encoder:
    def __init__(self, tokenizer_path, template, max_length, truncation="balanced", order="ab", prompt_cap=256):
        self.tok = Tokenizer.from_file(tokenizer_path)
        cfg = json.load(open(os.path.join(os.path.dirname(tokenizer_path), "tokenizer_config.json")))
        eos = cfg.get("eos_token")
        self.eos = eos["content"] if isinstance(eos, dict) else eos
        self.settings, self.pieces = read_template(template)
        probe = self.tok.encode("", add_special_tokens=True)
        n = 0
        while n < len(probe.ids) and probe.special_tokens_mask[n] == 1:
            n += 1
        self.prefix, self.suffix = probe.ids[:n], probe.ids[n:]
        bos = cfg.get("bos_token")
        bos = bos["content"] if isinstance(bos, dict) else bos
        if not self.prefix and bos and cfg.get("add_bos_token") is not False:
            self.prefix = [self.tok.token_to_id(bos)]
        self.literals = [self.tok.encode(t, add_special_tokens=False).ids if k == "text" else None for k, t in self.pieces]
        eos_id = self.tok.token_to_id(self.eos)
        self.eos_id = eos_id if self.settings["append_eos"] and (not self.suffix or self.suffix[-1] != eos_id) else None
        self.overhead = len(self.prefix) + len(self.suffix) + sum(len(l) for l in self.literals if l is not None) + (self.eos_id is not None)
        self.max_length, self.truncation, self.order, self.prompt_cap = max_length, truncation, order, prompt_cap
        self.slot_order = [t for k, t in self.pieces if k == "slot"]

    def text(self, turns):
        joined = self.settings["turn_separator"].join(turns)
        return joined.replace(self.eos, self.settings.get("replace_eos_with", "")) if self.eos else joined

    def cut(self, lengths):
        budget = self.max_length - self.overhead
        p, a, b = lengths
        if p + a + b <= budget and (self.truncation != "balanced" or p <= self.prompt_cap):
            return [p, a, b]
        if self.truncation in ("right", "left"):
            index = {"prompt": 0, "response_a": 1, "response_b": 2}
            order = [index[s] for s in self.slot_order]
            if self.truncation == "left":
                order.reverse()
            kept, left = [0, 0, 0], budget
            for i in order:
                kept[i] = min(lengths[i], left)
                left -= kept[i]
            return kept
        p = min(p, self.prompt_cap, budget)
        room = budget - p
        if a + b > room:
            excess = a + b - room
            if abs(a - b) >= excess:
                if a >= b:
                    a -= excess
                else:
                    b -= excess
            else:
                rest = excess - abs(a - b)
                a = b = min(a, b)
                a -= (rest + 1) // 2
                b -= rest // 2
        return [p, a, b]

    def encode_batch(self, rows):
        texts = []
        for prompt, ra, rb in rows:
            first, second = (ra, rb) if self.order == "ab" else (rb, ra)
            texts += [self.text(prompt), self.text(first), self.text(second)]
        encoded = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        out = []
        for r in range(len(rows)):
            parts = [encoded[3 * r + i].ids for i in range(3)]
            lengths = [len(x) for x in parts]
            kept = self.cut(lengths)
            if self.truncation == "left":
                parts = [x[len(x) - k:] for x, k in zip(parts, kept)]
            else:
                parts = [x[:k] for x, k in zip(parts, kept)]
            slot = {"prompt": parts[0], "response_a": parts[1], "response_b": parts[2]}
            ids = list(self.prefix)
            for (kind, value), literal in zip(self.pieces, self.literals):
                ids += literal if literal is not None else slot[value]
            if self.eos_id is not None:
                ids.append(self.eos_id)
            ids += self.suffix
            out.append((ids, kept != lengths))
        return out


def real_rows(n):
    rows = []
    path = os.path.join(SHARED, "data", "lmsys-arena", "train_sample.csv")
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            rows.append(tuple(json.loads(rec[c]) for c in ("prompt", "response_a", "response_b")))
    rows = [tuple(["" if t is None else t for t in turns] for turns in row) for row in rows]
    return [rows[i % len(rows)] for i in range(n)]


FIXTURE_ROWS = [
    (["What is the capital of France?"], ["Paris."], ["The capital of France is Paris, a city on the Seine."]),
    (["Write a haiku about rain", "Now one about snow"], ["Soft rain on the roof\nwhispers", "White hush"], ["Rain falls.", "Snow <eos> falls. <|end_of_text|> <|im_end|>"]),
    (["Explain " + "recursion " * 80], ["Recursion is when a function calls itself. " * 40], ["See: recursion. " * 5]),
    ([""], [""], ["Ünïcødé — 日本語のテキスト 🤗 and tabs\tand\nnewlines"]),
]


def fixture():
    cases = []
    for family in ("llama3", "gemma2", "qwen2_5"):
        tok = os.path.join(SHARED, "tokenizers", family, "tokenizer.json")
        for template in ("blackpearl", "emiz"):
            for truncation, max_length in (("balanced", 96), ("right", 80), ("left", 80), ("balanced", 4096)):
                for order in ("ab", "ba"):
                    enc = Encoder(tok, template, max_length, truncation, order)
                    for row, (ids, truncated) in zip(FIXTURE_ROWS, enc.encode_batch(FIXTURE_ROWS)):
                        cases.append(dict(tokenizer=family, template=template, truncation=truncation, max_length=max_length,
                                          order=order, prompt=row[0], response_a=row[1], response_b=row[2], input_ids=ids, truncated=truncated))
    out = os.path.join(ROOT, "tests", "fixtures", "tokenize", "expected.json")
    json.dump({"made_by": "benches/tokenize_reference.py fixture (tokenizers %s)" % __import__("tokenizers").__version__, "cases": cases}, open(out, "w"), ensure_ascii=False, indent=0)
    print("wrote", len(cases), "cases to", out)


def bench(args):
    rows = real_rows(args.rows)
    enc = Encoder(args.tokenizer, args.template, args.max_length, args.truncation, args.order)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = []
        for i in range(0, len(rows), args.batch):
            out += enc.encode_batch(rows[i:i + args.batch])
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    tokens = sum(len(ids) for ids, _ in out)
    print(json.dumps(dict(rows=len(rows), tokens=tokens, median_s=median, rows_per_s=len(rows) / median,
                          tokens_per_s=tokens / median, times=times, truncated=sum(t for _, t in out))))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fixture")
    b = sub.add_parser("bench")
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--template", default="blackpearl")
    b.add_argument("--max-length", type=int, default=1024)
    b.add_argument("--truncation", default="balanced")
    b.add_argument("--order", default="ab")
    b.add_argument("--rows", type=int, default=19820)
    b.add_argument("--batch", type=int, default=8192)
    b.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    fixture() if args.cmd == "fixture" else bench(args)


if __name__ == "__main__":
    main()
