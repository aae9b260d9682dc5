#!/usr/bin/env python3
"""Golden GPT-2 token ids from Hugging Face, for tests/test_tokenizer.cpp.

Usage:  python3 tools/goldens/make_tokenizer_goldens.py DATA_DIR OUT_DIR

DATA_DIR is ../shared/data (needs gpt2-tokenizer/{encoder.json,vocab.bpe},
glue-mrpc/dev.tsv, glue-sst2/dev.tsv, sentiment140/testdata.manual.2009.06.14.csv
and wikitext-2-raw/wiki.test.raw). Works offline. Writes into OUT_DIR:
  meta.json              versions, which Hugging Face path produced the ids, cross-checks
  corpus_<name>.json     per line: id count and FNV-1a 64 hash; full ids of the first 50 lines
  adversarial.json       hard strings with their full ids (special token recognised, and as text)

Lines, defined so the C++ test needs no dataset parser: read the file as bytes,
split on b"\\n", keep the "\\n" on every piece but a final empty one (which is
dropped), then decode UTF-8 (Sentiment140: Latin-1, each byte one code point).
Hash: FNV-1a 64 over the ids, each as 4 little-endian bytes, written as 16 hex digits.

Three independent Hugging Face paths are tried and must agree on every string:
  A  transformers GPT2TokenizerFast.from_pretrained(<folder with vocab.json + merges.txt>)
  B  the transformers constructor (v5: vocab=dict, merges=list; v4: vocab_file=, merges_file=)
  C  a raw `tokenizers.Tokenizer` from the JSON that the hub's gpt2 tokenizer.json holds
The goldens come from the first path that works and passes the sanity checks.
Exit status: 0 on success; 3 if goldens were written but the paths disagreed
(details in meta.json); 1 if no path worked.
"""

import json
import os
import shutil
import struct
import sys
import tempfile
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOT = "<|endoftext|>"
FIRST_LINES_WITH_IDS = 50
WHOLE_FILE_HEAD_IDS = 2048

CORPORA = [
    # name, path under DATA_DIR, text encoding, whole file as one string?
    ("mrpc_dev", "glue-mrpc/dev.tsv", "utf-8", False),
    ("sst2_dev", "glue-sst2/dev.tsv", "utf-8", False),
    ("sentiment140_test", "sentiment140/testdata.manual.2009.06.14.csv", "latin-1", False),
    ("wikitext2_test", "wikitext-2-raw/wiki.test.raw", "utf-8", False),
    ("wikitext2_test_whole", "wikitext-2-raw/wiki.test.raw", "utf-8", True),
]

ADVERSARIAL = [
    ("empty", ""),
    ("hello_world", "Hello world"),
    ("hello_world_leading_space", " Hello world"),
    ("emoji", "I love 🤗 and 😀!"),
    ("emoji_zwj_family", "👨\u200d👩\u200d👧\u200d👦 family"),
    ("emoji_skin_tones", "👍🏽 thumbs 👋🏿 wave"),
    ("emoji_flags", "🇺🇸🇯🇵 flags"),
    ("cjk", "日本語のテキストと中文文本，한국어 텍스트。"),
    ("arabic", "مرحبا بالعالم"),
    ("hebrew", "שלום עולם"),
    ("combining_decomposed", "cafe\u0301 re\u0301sume\u0301"),
    ("combining_precomposed", "caf\u00e9 r\u00e9sum\u00e9"),
    ("combining_leading", "\u0301\u0301 x\u0301"),
    ("trailing_spaces", "hello   "),
    ("leading_spaces", "   hello"),
    ("only_spaces", "     "),
    ("three_newlines", "\n\n\n"),
    ("space_newline_space", " \n "),
    ("double_space", "a  b"),
    ("tabs", "\t\t x"),
    ("mixed_whitespace", "a \t\n b\r\n\r\nc \u000b\u000c d"),
    ("crlf_lines", "line1\r\nline2\r\n"),
    ("nbsp", "a\u00a0b \u00a0 c\u00a0\u00a0"),
    ("ideographic_space", "a\u3000b\u3000\u3000c \u3000"),
    ("nel_u0085", "a\u0085b \u0085 c\u0085"),
    ("line_paragraph_separators", "a\u2028b\u2029c \u2028"),
    ("zero_width", "a\u200bb\u200cc\u200dd\ufeffe\u2060f \u200b"),
    ("mongolian_vowel_separator", "a\u180eb \u180e c"),
    ("unicode_spaces", "\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f x"),
    ("long_word_5000", "a" * 5000),
    ("long_word_after_space", " " + "b" * 3000 + " end"),
    ("long_space_run", " " * 1000 + "x"),
    ("long_digit_run", "1" * 1200),
    ("numbers", "1234567890 3.14 1,000,000 -42 1e10 0x1F 2\u00b2\u00b3 \u00bd \u0663\u0664 \u56db"),
    ("contractions", "don't DON'T we'll WE'LL I'm it's 's' ''s they're you've I'd"),
    ("quotes", "'hello' \"world\" `x` \u2018smart\u2019 \u201cquotes\u201d"),
    ("punctuation_runs", "!!! ??? ... --- *** ((()))"),
    ("eot_alone", EOT),
    ("eot_inside_text", "Hello" + EOT + "world"),
    ("eot_twice", EOT + EOT),
    ("eot_with_spaces", " " + EOT + " a " + EOT + "\n"),
    ("eot_adjacent_words", "end." + EOT + "The start"),
    ("eot_partial", "<|endoftext| <|endoftext <endoftext|> <|ENDOFTEXT|>"),
    ("eot_nested", "<|<|endoftext|>|>"),
    ("control_chars", "a\x00b\x01c\x7fd\x1b[0m"),
    ("info_separators", "a\x1cb \x1d c\x1e\x1f d"),  # whitespace to Python's re, not to Oniguruma
    ("bom_start", "\ufeffHello \ufeff"),
    ("latin1_supplement", "".join(chr(c) for c in range(0xA0, 0x100))),
    ("math_and_astral", "\u2211\u222b\u221a\u221e\u2248\u2260 \U0001d518\U0001d52b\U0001d526 \U0001d7d9\U0001d7da"),
    ("mixed_scripts", "Hello世界مرحباПривет123abc"),
    ("devanagari", "नमस्ते दुनिया"),
    ("thai", "สวัสดีชาวโลก"),
    ("private_use_and_max", "\ue000 \U0010fffd \U0001f600"),
    ("code", "https://example.com/path?q=1&x=y#frag\ndef f(x):\n    return x**2\n"),
]


# ------------------------------------------------------------------ helpers

def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for value in ids:
        for byte in struct.pack("<I", value):
            h ^= byte
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def split_lines(data: bytes):
    pieces = data.split(b"\n")
    lines = [p + b"\n" for p in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


def read_vocab_merges(data_dir):
    vocab_path = os.path.join(data_dir, "gpt2-tokenizer", "encoder.json")
    merges_path = os.path.join(data_dir, "gpt2-tokenizer", "vocab.bpe")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for line in f.read().split("\n"):
            if line.startswith("#version") or not line:
                continue
            left, right = line.split(" ")
            merges.append((left, right))
    return vocab_path, merges_path, vocab, merges


def tokenizer_json(vocab, merges, with_eot):
    """The structure of the hub's gpt2 tokenizer.json."""
    added = []
    if with_eot:
        added.append({"id": vocab[EOT], "content": EOT, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": True, "special": True})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": byte_level,
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [a + " " + b for a, b in merges]},
    })


# ------------------------------------------------------------------ the Hugging Face paths

def transformers_class():
    import transformers
    cls = getattr(transformers, "GPT2TokenizerFast", None) or getattr(transformers, "GPT2Tokenizer")
    return transformers, cls


def encoder_of(tok):
    return lambda text: list(tok.encode(text, add_special_tokens=False))


def path_a(vocab_path, merges_path, vocab, merges, tmp, split_special=False):
    _, cls = transformers_class()
    folder = os.path.join(tmp, "gpt2_tok")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        shutil.copyfile(vocab_path, os.path.join(folder, "vocab.json"))
        shutil.copyfile(merges_path, os.path.join(folder, "merges.txt"))
    kwargs = {"split_special_tokens": True} if split_special else {}
    tok = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    return tok, encoder_of(tok)


def path_b(vocab_path, merges_path, vocab, merges, tmp, split_special=False):
    import inspect
    _, cls = transformers_class()
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"split_special_tokens": True} if split_special else {}
    if "vocab_file" in params:  # transformers v4
        tok = cls(vocab_file=vocab_path, merges_file=merges_path, **kwargs)
    else:  # v5: a bare vocab_file= would be ignored and leave an empty vocabulary
        tok = cls(vocab=dict(vocab), merges=list(merges), **kwargs)
    return tok, encoder_of(tok)


def path_c(vocab_path, merges_path, vocab, merges, tmp, split_special=False):
    from tokenizers import Tokenizer
    # "As text" is the bare model: with no added token nothing can become 50256.
    tok = Tokenizer.from_str(tokenizer_json(vocab, merges, with_eot=not split_special))
    return tok, lambda text: list(tok.encode(text, add_special_tokens=False).ids)


PATHS = [("A_transformers_from_pretrained", path_a), ("B_transformers_constructor", path_b),
         ("C_tokenizers_from_json", path_c)]


def sanity_problems(encode, vocab, split_special):
    expect = {"Hello world": [vocab["Hello"], vocab["\u0120world"]],
              " Hello world": [vocab["\u0120Hello"], vocab["\u0120world"]]}
    problems = [f"{text!r} -> {encode(text)}, expected {ids}" for text, ids in expect.items() if encode(text) != ids]
    eot = encode(EOT)
    if split_special and vocab[EOT] in eot:
        problems.append(f"split_special_tokens ignored: {EOT!r} -> {eot}")
    if not split_special and eot != [vocab[EOT]]:
        problems.append(f"{EOT!r} -> {eot}, expected [{vocab[EOT]}]")
    return problems


# ------------------------------------------------------------------ main

def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 1
    data_dir, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    vocab_path, merges_path, vocab, merges = read_vocab_merges(data_dir)

    texts = {}  # name -> list of strings to encode
    for name, rel, encoding, whole in CORPORA:
        with open(os.path.join(data_dir, rel), "rb") as f:
            data = f.read()
        texts[name] = [data.decode(encoding)] if whole else [line.decode(encoding) for line in split_lines(data)]
    adversarial_texts = [text for _, text in ADVERSARIAL]

    meta = {"generator": "tools/goldens/make_tokenizer_goldens.py", "python": sys.version.split()[0],
            "paths": {}, "disagreements": []}
    for module in ("transformers", "tokenizers"):
        try:
            meta[module + "_version"] = __import__(module).__version__
        except Exception as e:  # noqa: BLE001 - report, never die, on a missing module
            meta[module + "_version"] = f"unavailable: {e}"
    print(f"transformers {meta['transformers_version']}, tokenizers {meta['tokenizers_version']}")

    results = {}        # path name -> {corpus name -> list of id lists}
    plain_results = {}  # path name -> adversarial ids with the special token as text
    with tempfile.TemporaryDirectory() as tmp:
        for path_name, build in PATHS:
            info = meta["paths"][path_name] = {}
            try:
                tok, encode = build(vocab_path, merges_path, vocab, merges, tmp)
                info["class"] = type(tok).__module__ + "." + type(tok).__name__
                problems = sanity_problems(encode, vocab, split_special=False)
                info["sanity_problems"] = problems
                if problems:
                    print(f"[{path_name}] FAILED sanity checks: {problems}")
                    continue
                results[path_name] = {name: [encode(t) for t in ts] for name, ts in texts.items()}
                results[path_name]["adversarial"] = [encode(t) for t in adversarial_texts]
                print(f"[{path_name}] ok ({info['class']})")
            except Exception as e:  # noqa: BLE001
                info["error"] = f"{type(e).__name__}: {e}"
                print(f"[{path_name}] unavailable: {info['error']}")
                traceback.print_exc(limit=3)
                continue
            try:
                _, encode_plain = build(vocab_path, merges_path, vocab, merges, tmp, split_special=True)
                problems = sanity_problems(encode_plain, vocab, split_special=True)
                info["split_special_problems"] = problems
                if not problems:
                    plain_results[path_name] = [encode_plain(t) for t in adversarial_texts]
                    print(f"[{path_name}] special token as text: ok")
                else:
                    print(f"[{path_name}] special token as text not supported: {problems}")
            except Exception as e:  # noqa: BLE001
                info["split_special_error"] = f"{type(e).__name__}: {e}"
                print(f"[{path_name}] special token as text unavailable: {info['split_special_error']}")

    if not results:
        print("ERROR: no Hugging Face path could encode; nothing written")
        json.dump(meta, open(os.path.join(out_dir, "meta.json"), "w"), indent=1)
        return 1
    primary = next(name for name, _ in PATHS if name in results)
    meta["ids_from"] = primary
    meta["agreeing_paths"] = []
    for name, res in results.items():
        diffs = [f"{key}[{i}]" for key in res for i, (a, b) in enumerate(zip(res[key], results[primary][key]))
                 if a != b]
        if diffs:
            meta["disagreements"].append({"path": name, "against": primary, "first": diffs[:20], "count": len(diffs)})
        else:
            meta["agreeing_paths"].append(name)
    plain_primary = next((name for name, _ in PATHS if name in plain_results), None)
    meta["as_text_ids_from"] = plain_primary
    for name, res in plain_results.items():
        diffs = [i for i, (a, b) in enumerate(zip(res, plain_results[plain_primary])) if a != b]
        if diffs:
            meta["disagreements"].append({"path": name + " (as text)", "against": plain_primary,
                                          "first": [ADVERSARIAL[i][0] for i in diffs[:20]], "count": len(diffs)})
    meta.update({
        "line_split": "bytes split on \\n; every piece but a final empty one keeps its \\n; then decoded",
        "hash": "FNV-1a 64 (offset 0xcbf29ce484222325, prime 0x100000001b3) over ids as uint32 little-endian",
        "encode_call": "encode(text, add_special_tokens=False)",
    })

    ids = results[primary]
    for name, rel, encoding, whole in CORPORA:
        per_line = ids[name]
        record = {"name": name, "file": rel, "encoding": encoding, "whole_file": whole,
                  "lines": len(per_line), "counts": [len(x) for x in per_line],
                  "hashes": [fnv1a64(x) for x in per_line]}
        if whole:
            record["first_ids"] = [per_line[0][:WHOLE_FILE_HEAD_IDS]]
        else:
            record["first_ids"] = per_line[:FIRST_LINES_WITH_IDS]
        with open(os.path.join(out_dir, f"corpus_{name}.json"), "w") as f:
            json.dump(record, f, separators=(",", ":"))
        print(f"{name}: {record['lines']} strings, {sum(record['counts'])} ids")

    cases = []
    for i, (name, text) in enumerate(ADVERSARIAL):
        cases.append({"name": name, "utf8_hex": text.encode("utf-8").hex(), "text": text, "ids": ids["adversarial"][i],
                      "ids_as_text": plain_results[plain_primary][i] if plain_primary else None})
    with open(os.path.join(out_dir, "adversarial.json"), "w") as f:
        json.dump({"cases": cases}, f, separators=(",", ":"), ensure_ascii=True)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)

    total = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir))
    print(f"wrote {out_dir} ({total} bytes); ids from {primary}; agreeing: {meta['agreeing_paths']}")
    if meta["disagreements"]:
        print("WARNING: Hugging Face paths disagree; see meta.json 'disagreements'")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
