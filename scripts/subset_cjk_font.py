"""Rebuild harness/report/fonts/cjk-subset.woff: the CJK characters the configs use, cut from Droid Sans Fallback.

The HTML report embeds this subset so 万亿 (and the Chinese in demand statements) render in a browser with no CJK
font installed. Source font: Debian's fonts-droid-fallback (Apache-2.0, Google):
    apt-get download fonts-droid-fallback && dpkg -x fonts-droid-fallback_*.deb /tmp/droid
    python scripts/subset_cjk_font.py /tmp/droid/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf
"""

import re
import sys
from pathlib import Path

from fontTools import subset

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "harness" / "report" / "fonts" / "cjk-subset.woff"


def used_characters() -> str:
    text = "万亿" + "".join(p.read_text() for p in sorted((ROOT / "configs").rglob("*.yaml")))
    return "".join(sorted(set(re.findall(r"[\u3000-\u9fff\uff00-\uffef]", text))))


def main(source: str) -> None:
    chars = used_characters()
    opts = subset.Options()
    opts.flavor = "woff"
    opts.name_IDs = ["*"]  # keep the copyright and licence records
    font = subset.load_font(source, opts)
    sub = subset.Subsetter(opts)
    sub.populate(text=chars)
    sub.subset(font)
    subset.save_font(font, str(OUT), opts)
    print(f"{OUT}: {len(chars)} characters, {OUT.stat().st_size} bytes: {chars}")


if __name__ == "__main__":
    main(sys.argv[1])
