#!/usr/bin/env python3
"""Fetch GPT-2 checkpoints and the CURLoRA benchmark data, in the layout of ../shared/data.

For users with internet. It writes into --out the same folders and file names that
../shared/data holds, so the C++ readers (data/datasets.h, data/wikitext.h) and the CLI
work unchanged with CURLORA_DATA_DIR=OUT:

  gpt2/ gpt2-medium/ gpt2-large/ gpt2-xl/   config.json model.safetensors vocab.json merges.txt
  gpt2-tokenizer/                           encoder.json vocab.bpe (= gpt2's vocab.json, merges.txt)
  glue-mrpc/       train.tsv dev.tsv test.tsv msr_paraphrase_{train,test}.txt dev_ids.tsv
  glue-sst2/       train.tsv dev.tsv test.tsv
  sentiment140/    testdata.manual.2009.06.14.csv
                   training.1600000.processed.noemoticon.head9999_tail10001.csv
                   sample-head50k-tail50k-text/{negative_first50000,positive_last50000}.txt
  wikitext-2-raw/  wiki.test.raw (+ wiki.valid.raw, wiki.train.raw)

Models come from the Hugging Face hub (huggingface_hub if installed, else plain HTTPS).
Data come from the original archives that GLUE's and Hugging Face's loaders download
(byte-exact, checked against the sha256 values in ../shared/data/*/PROVENANCE.md), with
the `datasets` library as a fallback where an archive is gone. Only the standard library
is required. Run with --dry-run first to see every URL and destination.
"""

import argparse
import collections
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile

MODELS = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
MODEL_REPOS = {name: "openai-community/" + name for name in MODELS}
MODEL_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
DATASETS = ["tokenizer", "mrpc", "sst2", "sentiment140", "wikitext"]

# Originals, as GLUE's download_glue_data.py and the HF loaders fetch them.
MRPC_URLS = {
    "msr_paraphrase_train.txt": ["https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"],
    "msr_paraphrase_test.txt": ["https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt"],
    "dev_ids.tsv": ["https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/"
                    "data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc"],
}
SST2_ZIP = ("SST-2.zip", ["https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"])
SENTIMENT140_ZIP = ("trainingandtestdata.zip", ["https://cs.stanford.edu/people/alecmgo/trainingandtestdata.zip",
                                                "http://cs.stanford.edu/people/alecmgo/trainingandtestdata.zip"])
WIKITEXT_ZIP = ("wikitext-2-raw-v1.zip", ["https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
                                          "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"])

# sha256 of the files in ../shared/data (from each folder's PROVENANCE.md).
REFERENCE_SHA256 = {
    "gpt2-tokenizer/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2-tokenizer/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "glue-mrpc/msr_paraphrase_train.txt": "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89",
    "glue-mrpc/msr_paraphrase_test.txt": "a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784",
    "glue-mrpc/dev_ids.tsv": "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7",
    "glue-mrpc/train.tsv": "69abcedee3cf738c6ce58d772e43e1b7cdf5b4edee4aceda459c0d9f4e5599f3",
    "glue-mrpc/dev.tsv": "9e8f284788040f7c9ecde2e1b3c07237c756f926bd9ef8548ef5d34b56f69f17",
    "glue-mrpc/test.tsv": "aee460ceda833926b8ab2ad952d399f5cf8bc9335cff19afcac03dc449558622",
    "glue-sst2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "glue-sst2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    "glue-sst2/test.tsv": "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13",
    "sentiment140/testdata.manual.2009.06.14.csv": "c77669cc86ae85d3807d65fc13fed0c395266db518d4eaa0ff1f19bf6efbbdd3",
    "sentiment140/training.1600000.processed.noemoticon.head9999_tail10001.csv":
        "7b0dea90c835ddafc47e0e3053476c1709d3f9fc92bd1d22274847f5985584e5",
    "sentiment140/sample-head50k-tail50k-text/negative_first50000.txt":
        "91305124952116f2a29e1b1024eb74f74f6bfdf566189ffed2f0bfa9b181a3b7",
    "sentiment140/sample-head50k-tail50k-text/positive_last50000.txt":
        "9974fca006a8ba35d363f2444712b16479948ba2fc9613a2d42cdd143251769d",
    "wikitext-2-raw/wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
}
# Every GPT-2 size ships the same tokenizer files.
for _model in MODELS:
    REFERENCE_SHA256[_model + "/vocab.json"] = REFERENCE_SHA256["gpt2-tokenizer/encoder.json"]
    REFERENCE_SHA256[_model + "/merges.txt"] = REFERENCE_SHA256["gpt2-tokenizer/vocab.bpe"]
# Only a prefix of HF gpt2's model.safetensors hash is on record (../shared/data/README.md).
GPT2_SAFETENSORS = {"size": 548105171, "sha256_prefix": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b4"}


class FetchError(Exception):
    pass


def log(message):
    print(message, file=sys.stderr, flush=True)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path, data):
    """Writes bytes next to `path`, then renames: an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    with open(part, "wb") as f:
        f.write(data)
    os.replace(part, path)


class Fetcher:
    def __init__(self, args):
        self.out = os.path.abspath(args.out)
        self.dry_run = args.dry_run
        self.force = args.force
        self.verify = not args.no_verify
        self.source_dir = args.source_dir
        self.keep_full_sentiment140 = args.keep_full_sentiment140
        self.downloads = tempfile.mkdtemp(prefix="curlora-fetch-") if not args.dry_run else None
        self.problems = []

    def path(self, relative):
        return os.path.join(self.out, relative)

    def have(self, relative):
        """True when the file exists and (if a reference hash is known) matches it; --force re-fetches."""
        path = self.path(relative)
        if self.force or not os.path.exists(path):
            return False
        expected = REFERENCE_SHA256.get(relative)
        return expected is None or sha256_of(path) == expected

    # ---- getting bytes ----

    def download(self, urls, dest):
        """Streams the first URL that works into `dest` (atomically), with retries."""
        errors = []
        for url in urls:
            for attempt in range(3):
                try:
                    request = urllib.request.Request(url, headers={"User-Agent": "curlora-fetch/1.0"})
                    with urllib.request.urlopen(request, timeout=60) as response:
                        total = int(response.headers.get("Content-Length") or 0)
                        os.makedirs(os.path.dirname(dest), exist_ok=True)
                        part, done, shown = dest + ".part", 0, -1
                        with open(part, "wb") as f:
                            for block in iter(lambda: response.read(1 << 20), b""):
                                f.write(block)
                                done += len(block)
                                percent = done * 100 // total if total else -1
                                if total and percent // 10 != shown:
                                    shown = percent // 10
                                    log(f"    {os.path.basename(dest)}: {done >> 20} / {total >> 20} MiB")
                        if total and done != total:
                            raise FetchError(f"got {done} of {total} bytes")
                        os.replace(part, dest)
                        return url
                except Exception as e:  # network errors come in many types; retry, then try the next URL
                    errors.append(f"{url}: {e}")
                    time.sleep(2 ** attempt)
        raise FetchError("could not download " + os.path.basename(dest) + ":\n  " + "\n  ".join(errors))

    def original(self, name, urls):
        """A source file: from --source-dir if it is there, else downloaded to a scratch folder."""
        if self.source_dir and os.path.exists(os.path.join(self.source_dir, name)):
            log(f"  using {os.path.join(self.source_dir, name)}")
            return os.path.join(self.source_dir, name)
        dest = os.path.join(self.downloads, name)
        log(f"  downloading {urls[0]}")
        self.download(urls, dest)
        return dest

    def check(self, relative, strict=True):
        """Compares a written file with ../shared/data's sha256; a mismatch is an error unless --no-verify."""
        expected = REFERENCE_SHA256.get(relative)
        if expected is None:
            return
        actual = sha256_of(self.path(relative))
        if actual == expected:
            log(f"  ok   {relative} (sha256 matches ../shared/data)")
            return
        message = f"{relative}: sha256 {actual[:16]}... differs from the reference {expected[:16]}..."
        if strict and self.verify:
            raise FetchError(message + " (rerun with --no-verify to keep it)")
        self.problems.append(message)
        log("  WARN " + message)

    # ---- models ----

    def model(self, name):
        repo = MODEL_REPOS[name]
        for file in MODEL_FILES:
            relative = f"{name}/{file}"
            url = f"https://huggingface.co/{repo}/resolve/main/{file}"
            if self.dry_run:
                print(f"model  {url}\n    -> {self.path(relative)}")
                continue
            if self.have(relative):
                log(f"  have {relative}")
                continue
            try:
                from huggingface_hub import hf_hub_download  # optional: resumable, cached
            except ImportError:
                hf_hub_download = None
            if hf_hub_download:
                try:
                    cached = hf_hub_download(repo_id=repo, filename=file)
                except Exception as e:  # the hub client raises its own error types
                    raise FetchError(f"huggingface_hub could not fetch {repo}/{file}: {e}")
                os.makedirs(self.path(name), exist_ok=True)
                shutil.copyfile(cached, self.path(relative) + ".part")
                os.replace(self.path(relative) + ".part", self.path(relative))
            else:
                log(f"  downloading {url}")
                self.download([url], self.path(relative))
            self.check(relative)
        if name == "gpt2" and not self.dry_run:
            path = self.path("gpt2/model.safetensors")
            if os.path.getsize(path) != GPT2_SAFETENSORS["size"] or \
                    not sha256_of(path).startswith(GPT2_SAFETENSORS["sha256_prefix"]):
                self.problems.append("gpt2/model.safetensors: size or sha256 differs from the recorded HF file")

    def tokenizer(self):
        """gpt2-tokenizer/ holds gpt2's vocab.json and merges.txt under OpenAI's names (the shared
        tokenizer the CLI falls back to for a model folder without its own)."""
        pairs = [("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")]
        for hf_name, openai_name in pairs:
            relative = f"gpt2-tokenizer/{openai_name}"
            url = f"https://huggingface.co/{MODEL_REPOS['gpt2']}/resolve/main/{hf_name}"
            if self.dry_run:
                print(f"tokenizer  {url} (or gpt2/{hf_name} if fetched)\n    -> {self.path(relative)}")
                continue
            if self.have(relative):
                log(f"  have {relative}")
                continue
            if os.path.exists(self.path(f"gpt2/{hf_name}")):
                os.makedirs(self.path("gpt2-tokenizer"), exist_ok=True)
                shutil.copyfile(self.path(f"gpt2/{hf_name}"), self.path(relative))
            else:
                self.download([url], self.path(relative))
            self.check(relative)

    # ---- GLUE MRPC: rebuilt from the SentEval files exactly as download_glue_data.py does ----

    def mrpc(self):
        if self.dry_run:
            for name, urls in MRPC_URLS.items():
                print(f"mrpc   {urls[0]}\n    -> {self.path('glue-mrpc/' + name)}")
            print(f"mrpc   build train.tsv, dev.tsv, test.tsv -> {self.path('glue-mrpc')}")
            return
        if all(self.have("glue-mrpc/" + n) for n in list(MRPC_URLS) + ["train.tsv", "dev.tsv", "test.tsv"]):
            log("  have glue-mrpc/")
            return
        for name, urls in MRPC_URLS.items():
            relative = "glue-mrpc/" + name
            if not self.have(relative):
                with open(self.original(name, urls), "rb") as f:
                    write_atomic(self.path(relative), f.read())
                self.check(relative)

        def rows(path):  # text mode with universal newlines, as the GLUE script reads them
            with open(path, encoding="utf8", newline=None) as f:
                return f.readline(), f.readlines()

        with open(self.path("glue-mrpc/dev_ids.tsv"), encoding="utf8") as f:
            dev_ids = [row.strip().split("\t") for row in f]
        header, train_rows = rows(self.path("glue-mrpc/msr_paraphrase_train.txt"))
        train, dev = [header], [header]  # the header keeps the file's BOM, as in GLUE's copies
        for row in train_rows:
            label, id1, id2, s1, s2 = row.strip().split("\t")
            (dev if [id1, id2] in dev_ids else train).append(f"{label}\t{id1}\t{id2}\t{s1}\t{s2}\n")
        _, test_rows = rows(self.path("glue-mrpc/msr_paraphrase_test.txt"))
        test = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
        for index, row in enumerate(test_rows):
            _, id1, id2, s1, s2 = row.strip().split("\t")
            test.append(f"{index}\t{id1}\t{id2}\t{s1}\t{s2}\n")
        for name, lines in (("train.tsv", train), ("dev.tsv", dev), ("test.tsv", test)):
            write_atomic(self.path("glue-mrpc/" + name), "".join(lines).encode("utf8"))
            self.check("glue-mrpc/" + name)

    # ---- GLUE SST-2: the GLUE archive, else HF datasets ----

    def sst2(self):
        names = ["train.tsv", "dev.tsv", "test.tsv"]
        if self.dry_run:
            print(f"sst2   {SST2_ZIP[1][0]} (fallback: datasets.load_dataset('nyu-mll/glue', 'sst2'))\n"
                  f"    -> {', '.join(self.path('glue-sst2/' + n) for n in names)}")
            return
        if all(self.have("glue-sst2/" + n) for n in names):
            log("  have glue-sst2/")
            return
        try:
            with zipfile.ZipFile(self.original(*SST2_ZIP)) as archive:
                for name in names:
                    write_atomic(self.path("glue-sst2/" + name), archive.read("SST-2/" + name))
        except FetchError as e:
            log(f"  {e}\n  falling back to the datasets library")
            self.sst2_from_hub()
        for name in names:
            self.check("glue-sst2/" + name, strict=False)

    def sst2_from_hub(self):
        from datasets import load_dataset  # raises ImportError with a clear message when absent
        sst = load_dataset("nyu-mll/glue", "sst2")
        for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
            lines = ["sentence\tlabel\n"] + [f"{r['sentence']}\t{r['label']}\n" for r in sst[split]]
            write_atomic(self.path("glue-sst2/" + name), "".join(lines).encode("utf8"))
        lines = ["index\tsentence\n"] + [f"{r['idx']}\t{r['sentence']}\n" for r in sst["test"]]
        write_atomic(self.path("glue-sst2/test.tsv"), "".join(lines).encode("utf8"))

    # ---- Sentiment140: the Stanford archive, then the samples ../shared/data carries ----

    def sentiment140(self):
        test_csv = "testdata.manual.2009.06.14.csv"
        full_csv = "training.1600000.processed.noemoticon.csv"
        sample = "sentiment140/training.1600000.processed.noemoticon.head9999_tail10001.csv"
        negative = "sentiment140/sample-head50k-tail50k-text/negative_first50000.txt"
        positive = "sentiment140/sample-head50k-tail50k-text/positive_last50000.txt"
        outputs = ["sentiment140/" + test_csv, sample, negative, positive]
        if self.dry_run:
            print(f"sentiment140  {SENTIMENT140_ZIP[1][0]}\n    -> " + ", ".join(self.path(o) for o in outputs)
                  + (f", {self.path('sentiment140/' + full_csv)}" if self.keep_full_sentiment140 else ""))
            return
        if all(self.have(o) for o in outputs) and not self.keep_full_sentiment140:
            log("  have sentiment140/")
            return
        with zipfile.ZipFile(self.original(*SENTIMENT140_ZIP)) as archive:
            write_atomic(self.path(outputs[0]), archive.read(test_csv))
            # 1.6M rows (238 MB): keep the first 50000 and last 50000 lines, bytes untouched.
            head, tail = [], collections.deque(maxlen=50000)
            with archive.open(full_csv) as f:
                for line in f:
                    if len(head) < 50000:
                        head.append(line)
                    tail.append(line)
            if self.keep_full_sentiment140:
                write_atomic(self.path("sentiment140/" + full_csv), archive.read(full_csv))
        tail = list(tail)
        write_atomic(self.path(sample), b"".join(head[:9999] + tail[-10001:]))

        def text_of(line):  # field 6 of a fully quoted row, Latin-1 decoded as pandas reads it
            import csv
            row = next(csv.reader([line.decode("latin-1")]))
            return row[5] + "\n"

        write_atomic(self.path(negative), "".join(text_of(l) for l in head).encode("utf8"))
        write_atomic(self.path(positive), "".join(text_of(l) for l in tail).encode("utf8"))
        for output in outputs:
            self.check(output, strict=output != negative and output != positive)

    # ---- WikiText-2 raw: the original archive, else HF datasets rows turned back into lines ----

    def wikitext(self):
        names = ["wiki.test.raw", "wiki.valid.raw", "wiki.train.raw"]
        if self.dry_run:
            print(f"wikitext  {WIKITEXT_ZIP[1][0]} (fallback: datasets.load_dataset('Salesforce/wikitext', "
                  f"'wikitext-2-raw-v1'))\n    -> " + ", ".join(self.path("wikitext-2-raw/" + n) for n in names))
            return
        if all(self.have("wikitext-2-raw/" + n) for n in names):
            log("  have wikitext-2-raw/")
            return
        try:
            with zipfile.ZipFile(self.original(*WIKITEXT_ZIP)) as archive:
                for name in names:
                    write_atomic(self.path("wikitext-2-raw/" + name), archive.read("wikitext-2-raw/" + name))
        except FetchError as e:
            log(f"  {e}\n  falling back to the datasets library")
            from datasets import load_dataset
            wiki = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
            for split, name in (("test", "wiki.test.raw"), ("validation", "wiki.valid.raw"), ("train", "wiki.train.raw")):
                # HF rows are lines with their '\n'; blank lines became "" and were " \n" in the file.
                text = "".join(row if row else " \n" for row in wiki[split]["text"])
                write_atomic(self.path("wikitext-2-raw/" + name), text.encode("utf8"))
        self.check("wikitext-2-raw/wiki.test.raw")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="curlora-data",
                        help="destination folder (default ./curlora-data); then set CURLORA_DATA_DIR to it")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of " + ",".join(MODELS) + ", or 'none' (gpt2-xl is 6.4 GB)")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated subset of " + ",".join(DATASETS) + ", or 'none'")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched, touch nothing")
    parser.add_argument("--force", action="store_true", help="fetch again even when a file is present and verifies")
    parser.add_argument("--no-verify", action="store_true", help="keep files whose sha256 differs from ../shared/data's")
    parser.add_argument("--source-dir", help="a folder of originals downloaded by hand (msr_paraphrase_*.txt, "
                        "dev_ids.tsv, SST-2.zip, trainingandtestdata.zip, wikitext-2-raw-v1.zip), used before the network")
    parser.add_argument("--keep-full-sentiment140", action="store_true",
                        help="also keep the full 1.6M-row Sentiment140 training CSV (238 MB)")
    args = parser.parse_args()

    def subset(value, known):
        chosen = [] if value == "none" else [v for v in value.split(",") if v]
        unknown = [v for v in chosen if v not in known]
        if unknown:
            parser.error(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        return chosen

    models, datasets = subset(args.models, MODELS), subset(args.datasets, DATASETS)
    fetcher = Fetcher(args)
    if args.dry_run:
        print(f"# dry run: nothing is downloaded or written; destination {fetcher.out}")
    try:
        for name in models:
            log(f"[model {name}]")
            fetcher.model(name)
        for name in datasets:
            log(f"[{name}]")
            getattr(fetcher, name)()
    except (FetchError, ImportError, OSError, KeyError, zipfile.BadZipFile) as e:
        log(f"error: {type(e).__name__}: {e}")
        return 1
    finally:
        if fetcher.downloads:
            shutil.rmtree(fetcher.downloads, ignore_errors=True)
    for problem in fetcher.problems:
        log("warning: " + problem)
    if not args.dry_run:
        log(f"done: {fetcher.out}" + (f" ({len(fetcher.problems)} warnings)" if fetcher.problems else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
