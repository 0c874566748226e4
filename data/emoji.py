"""Colour emoji as an ImageFolder of PNGs with a .txt caption each, a small text-to-image set.

    apt-get install fonts-noto-color-emoji unicode-data
    python data/emoji.py                                  # -> data/emoji/train/<kk>_<group>/<index>.png + .txt
    python data/emoji.py --label subgroup --out data/emoji/subgroup

Source: every `fully-qualified` line of Unicode's emoji-test.txt (about 3,650), drawn with the Noto
Color Emoji font. Output: OUT/<kk>_<label>/<index>.png and OUT/<kk>_<label>/<index>.txt, where
<label> is the emoji's group (9 classes, the default) or subgroup (about 99 classes), numbered in
emoji-test.txt order so that sorted folders give stable class indices; <index> is the emoji's
position among the fully-qualified lines, and the .txt holds its name ("red apple") as caption.
ImageFolder only lists image extensions, so the .txt files do not disturb class-conditional training.

Why these steps: the font holds colour bitmaps at one strike only, which Pillow draws at font size
109 with embedded_color=True as a 136x128 RGBA image; it is composited on white (the model has no
alpha), padded to a 136x136 square so no glyph is cut, then resized to --size. A sequence the font
has no glyph for draws nothing and is skipped and counted. ZWJ sequences (families, skin tones,
flags) need Pillow's raqm layout to become one glyph; without it they draw as several glyphs side by
side, and are skipped too.
"""
import argparse
import os
import re

from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
APT = "apt-get install fonts-noto-color-emoji unicode-data"
FONT_SIZE = 109  # the only size at which Pillow loads the font's bitmap strike

# "1F34E ; fully-qualified # 🍎 E0.6 red apple" -> code points, status, name
LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*([\w-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+?)\s*$")


def parse_emoji_test(lines):
    """Return one dict per fully-qualified emoji: text, codepoints, group, subgroup, name."""
    group = subgroup = None
    emoji = []
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            m = LINE.match(line)
            if m is None:
                raise ValueError(f"cannot parse emoji-test line: {line!r}")
            codes, status, name = m.groups()
            if status != "fully-qualified":
                continue
            codepoints = codes.split()
            emoji.append(dict(text="".join(chr(int(c, 16)) for c in codepoints),
                              codepoints=codepoints, group=group, subgroup=subgroup, name=name))
    return emoji


def slug(s):
    """'Smileys & Emotion' -> 'smileys-emotion', safe as a folder name."""
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def class_dirs(emoji, label):
    """Map each group (or subgroup) to a folder name '<kk>_<slug>', numbered in file order."""
    names = list(dict.fromkeys(e[label] for e in emoji))
    return {n: f"{k:02d}_{slug(n)}" for k, n in enumerate(names)}


def render(font, text, size):
    """Draw one emoji as a size x size RGB image on white, or None if the font has no glyph for it."""
    left, top, right, bottom = font.getbbox(text)
    if right - left <= 0 or bottom - top <= 0:
        return None
    if right - left > 1.5 * FONT_SIZE:  # drawn as several glyphs: no single glyph for the sequence
        return None
    rgba = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).text((0, 0), text, font=font, embedded_color=True)
    if rgba.getbbox() is None:  # nothing drawn at all
        return None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return square.resize((size, size), Image.LANCZOS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", choices=["group", "subgroup"], default="group", help="what the class folders are")
    p.add_argument("--out", default=None, help="default: data/emoji/train next to this script")
    p.add_argument("--size", type=int, default=64, help="output side in pixels")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N emoji per class")
    p.add_argument("--skip-skin-tones", action="store_true",
                   help="leave out the skin-tone variants (1,785 near-duplicates of 1,870 others)")
    p.add_argument("--font", default=FONT)
    p.add_argument("--emoji-test", default=EMOJI_TEST)
    args = p.parse_args(argv)

    missing = [f for f in (args.font, args.emoji_test) if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"error: missing {', '.join(missing)}; install them with: {APT}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji", "train")
    # a rerun with a smaller --limit would otherwise leave stale images behind
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"error: {out} is not empty; remove it first")
    if not features.check("raqm"):
        print("warning: Pillow has no raqm layout; multi-code-point emoji will be skipped")

    with open(args.emoji_test, encoding="utf-8") as f:
        emoji = parse_emoji_test(f)
    dirs = class_dirs(emoji, args.label)  # numbered before --limit or skips, so numbers are stable
    font = ImageFont.truetype(args.font, FONT_SIZE)
    counts = dict.fromkeys(dirs.values(), 0)
    skipped = []
    width = len(str(len(emoji) - 1))
    for i, e in enumerate(tqdm(emoji, desc=out)):
        d = dirs[e[args.label]]
        if (args.limit is not None and counts[d] >= args.limit) or (args.skip_skin_tones and "skin tone" in e["name"]):
            continue
        im = render(font, e["text"], args.size)
        if im is None:
            skipped.append(e)
            continue
        os.makedirs(os.path.join(out, d), exist_ok=True)
        stem = os.path.join(out, d, f"{i:0{width}d}")
        im.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(e["name"])
        counts[d] += 1

    print(f"wrote {sum(counts.values())} images of {args.size}x{args.size} in {len(dirs)} {args.label} "
          f"classes to {out}; skipped {len(skipped)} with no glyph in the font")
    for e in skipped[:20]:
        print(f"  skipped {' '.join(e['codepoints'])} {e['name']}")
    if args.label == "group":
        for d, n in counts.items():
            print(f"  {d:25s} {n}")
    return counts, skipped


if __name__ == "__main__":
    main()
