"""A deterministic corpus for tokenizer fidelity: what a tokenizer must get exactly right.

`corpus()` returns the same list of texts on every call and machine: prose in many scripts,
code with indentation, numbers, emoji (ZWJ sequences, flags, skin tones), runs of spaces, tabs
and newlines, edge cases of normalization, and, last, texts with special tokens written in
them (so a caller that takes the first N texts gets plain text first). The validator reuses it.
"""
from __future__ import annotations

from functools import lru_cache

PROSE = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "It was the best of times, it was the worst of times, it was the age of wisdom.",
        "Distributed inference splits each weight matrix across the boards of a small cluster.",
        "She said: \"I'll be there at half past nine, don't wait for me.\"",
        "Mr. O'Neill's co-workers weren't sure whether they'd finish by Friday.",
        "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.",
        "A tokenizer maps text to integers; a detokenizer maps them back, ideally without loss.",
        "Why? Because... well, nobody really knows!!! (Or do they?)",
    ],
    "fr": ["Le cœur a ses raisons que la raison ne connaît point.",
           "Où est la bibliothèque ? Elle est à côté de l'église, près du château."],
    "de": ["Größenwahn und Straßenbahnhaltestelle sind schöne deutsche Wörter.",
           "Die Würde des Menschen ist unantastbar. Sie zu achten und zu schützen ist Verpflichtung aller staatlichen "
           "Gewalt."],
    "es": ["¿Dónde está el baño? ¡Qué día tan bonito hace hoy en Málaga!",
           "El niño comió añejo jamón en la montaña."],
    "pt": ["A ação de graças não é só no coração; é também nas mãos.",
           "São Paulo é a maior cidade do hemisfério sul."],
    "it": ["Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura."],
    "pl": ["Zażółć gęślą jaźń. Pchnąć w tę łódź jeża lub ośm skrzyń fig."],
    "cs": ["Příliš žluťoučký kůň úpěl ďábelské ódy."],
    "tr": ["Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul'da ılık bir gün."],
    "vi": ["Tiếng Việt có sáu thanh điệu: ngang, huyền, sắc, hỏi, ngã, nặng."],
    "ru": ["Съешь же ещё этих мягких французских булок, да выпей чаю.",
           "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему."],
    "uk": ["Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів!"],
    "el": ["Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Η γλώσσα μου έδωσαν ελληνική."],
    "ar": ["نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر ومغلف بجلد أزرق.",
           "مرحبا بالعالم! كيف حالك اليوم؟ ١٢٣ و 456."],
    "he": ["דג סקרן שט בים מאוכזב ולפתע מצא חברה.", "שלום עולם, מה שלומך?"],
    "fa": ["به نام خداوند جان و خرد، کزین برتر اندیشه برنگذرد."],
    "zh": ["我能吞下玻璃而不伤身体。", "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。",
           "分布式推理把每个权重矩阵切分到小型集群的各个节点上。"],
    "ja": ["いろはにほへと ちりぬるを わかよたれそ つねならむ", "私はガラスを食べられます。それは私を傷つけません。",
           "東京タワーは３３３メートルです。"],
    "ko": ["다람쥐 헌 쳇바퀴에 타고파.", "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요."],
    "hi": ["मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती।", "नमस्ते दुनिया! आप कैसे हैं?"],
    "bn": ["আমি কাঁচ খেতে পারি, তাতে আমার কোনো ক্ষতি হয় না।"],
    "ta": ["யாமறிந்த மொழிகளிலே தமிழ்மொழி போல் இனிதாவது எங்கும் காணோம்."],
    "th": ["เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน", "สวัสดีครับ ยินดีที่ได้รู้จัก"],
    "ka": ["ვეპხის ტყაოსანი შოთა რუსთაველი"],
    "hy": ["Կրնամ ապակի ուտել և ինծի անհանգիստ չըներ։"],
    "am": ["ሰማይ አይታረስ ንጉሥ አይከሰስ።"],
    "sw": ["Habari ya asubuhi? Ninaweza kula glasi, haiumizi."],
}

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Node:\n    def __init__(self, value):\n        self.value = value\n        self.next = None\n\n    def "
    "__repr__(self):\n        return f\"Node({self.value!r})\"\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "#include <stdio.h>\n\nint main(void) {\n    printf(\"hello, world\\n\");\n    return 0;\n}\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "const sum = (xs) => xs.reduce((a, b) => a + b, 0);\nconsole.log(sum([1, 2, 3]));",
    "SELECT name, COUNT(*) AS n\nFROM users\nWHERE created_at >= '2024-01-01'\nGROUP BY name\nORDER BY n DESC;",
    "<!DOCTYPE html>\n<html>\n  <body>\n    <p class=\"x\">Hi &amp; bye</p>\n  </body>\n</html>",
    "{\"name\": \"dllama\", \"version\": \"0.1.0\", \"tags\": [\"llm\", \"pi\"], \"ok\": true, \"n\": null}",
    "server:\n  host: 0.0.0.0\n  port: 9990\n  workers:\n    - 10.0.0.2:9998\n    - 10.0.0.3:9998\n",
    "all: build\n\nbuild:\n\t$(CC) -O3 -o app main.c\n\nclean:\n\trm -f app\n",
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do\n  wc -l \"$f\"\ndone\n",
    "    if x:\n        return y\n    else:\n        return z",
    "    return",
    "        return None",
    "x = [1,2,3]\ny = {k: v for k, v in zip('abc', x)}\nassert y['b'] == 2",
    "// TODO(alice): fix the off-by-one in slices.rs:42\nlet end = start + len - 1;",
    "\\begin{equation}\n  E = mc^2 \\quad \\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2}\n\\end{equation}",
    "```python\nprint('fenced')\n```\n",
    "git commit -m \"fix: don't double-add bos\" -- dllama/tokenizer/core.py",
    "https://huggingface.co/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.json?download=true",
    "mailto:someone@example.com, user.name+tag@sub.domain.org",
    "a==b!=c<=d>=e&&f||g->h=>i::j++k--l**m//n%%o",
    "@decorator\nasync def handler(request: Request) -> Response:\n    data = await request.json()\n    return "
    "JSONResponse(data)",
]

NUMBERS = [
    "0", "7", "42", "123", "1234", "12345", "1234567890", "3.14159265358979", "-0.5", "+1e-10", "6.022e23",
    "1,000,000", "1.000.000,50", "$19.99", "€5", "£1,234.56", "¥10000", "100%", "50/50", "2024-11-25",
    "25.11.2026 14:05:28", "12:30:45.123Z", "+48 123 456 789", "(555) 123-4567", "0x7FFF_FFFF", "0b1010",
    "v1.2.3-rc.4", "192.168.0.1:8080", "3/4 + 1/8 = 7/8", "2^32 = 4294967296", "π ≈ 3.1416", "1st 2nd 3rd 4th",
    "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "１２３４５", "Ⅰ Ⅱ Ⅲ Ⅳ Ⅻ", "½ ¼ ¾ ⅓",
    "In 1969, 3 astronauts flew 384,400 km; 2 walked on the Moon for 21.5 hours.",
]

EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇵🇱🇯🇵🇺🇸", "❤️", "1️⃣ 2️⃣ #️⃣", "🧑🏿‍💻", "👩‍❤️‍💋‍👨",
    "Great job! 🎉🎉🎉", "I ❤️ Raspberry Pi 🍓🥧", "weather: ☀️ → 🌧️ → ⛈️", "🤖: beep boop",
    "emoji in code: print('🐍')", "🫠🫡🫶 new ones", "✅ done ❌ failed ⚠️ warning",
]

WHITESPACE = [
    " ", "  ", "    ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n ", "\t \t \n",
    "a  b   c    d", "a\tb\t\tc", "line one\nline two\n\nline four", "trailing spaces   ", "   leading spaces",
    "\n\nstarts with newlines", "ends with newlines\n\n", "mixed \t\n \r\n whitespace", "a\u00a0b\u00a0\u00a0c",
    "zero\u200bwidth\u200cjoiners\u200d", "ideographic\u3000space", "    return x", "\tindented with tab",
    "word\n    return value", "   \n   \n   ", "x" + " " * 17 + "y", "\n" * 7 + "end",
]

EDGE = [
    "", "a", "A", ".", "...", "!!!", "???", "—", "–-", "«»", "„“", "‘’", "''", "\"\"", "()[]{}<>",
    "e\u0301 vs é", "ﬁ ﬂ ﬀ", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "ｶﾀｶﾅ", "ℌ𝔢𝔩𝔩𝔬 𝕎𝕠𝕣𝕝𝕕", "𠀀𠀁𠀂 rare CJK",
    "\ue000 private use", "control \x07 bell", "tab\x0bvertical", "Ǆ ǅ ǆ", "İı", "ß ẞ", "Ω Ω", "Å Å",
    "ALL CAPS SENTENCE WITH SHOUTING", "MiXeD cAsE tExT", "snake_case_identifier camelCaseIdentifier",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababab", "----------", "==========",
    "**bold** _italic_ `code` [link](http://x.y)", "# Heading\n\n- item 1\n- item 2\n  - nested",
    "| a | b |\n|---|---|\n| 1 | 2 |", "> quoted\n> text", "C:\\Users\\pi\\Documents\\model.m",
    "/home/pi/models/llama-2-7b.q40.m", "日本語とEnglishのmixed text", "Русский and English вперемешку",
    "עברית with English", "مرحبا hello", "Ελληνικά και English", "हिंदी और English",
]

SPECIAL = [
    "<s>", "</s>", "<unk>", "<s>Hello</s>", "Hello <s> world </s>", "text</s>", "<s> leading bos",
    "<|eos|>", "<|bos|>", "<|bos|>user: hi\nassistant:", "a<|eos|>b", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "[INST] what is 2+2? [/INST]",
    "<<SYS>>\nYou are helpful.\n<</SYS>>", "<0x41> looks like a byte piece", "< s > not special", "<s<s>>",
    "</s></s></s>", "<s>\n</s>\n", "literal <|eos|> in a sentence with <s> and </s> tokens",
]

_TEMPLATES = [
    "{t}", " {t}", "{t}\n", "{t} {t}", "{t}\n\n{t}", "  {t}  ", "\t{t}", "{t}!", "\"{t}\"", "({t})",
]


def _prose() -> list[str]:
    return [text for texts in PROSE.values() for text in texts]


def _variations(seeds: list[str]) -> list[str]:
    """Each seed inside each template, round-robin, so boundaries (leading space, newline,
    repetition) are exercised with every script."""
    out = []
    for i, seed in enumerate(seeds):
        for k in range(3):
            out.append(_TEMPLATES[(i + k * 3) % len(_TEMPLATES)].format(t=seed))
    return out


def _mixes(seeds: list[str]) -> list[str]:
    """Pairs of texts from different categories joined by different separators."""
    separators = [" ", "\n", "\t", "  ", "\n\n", ", ", " — ", ""]
    out = []
    for i in range(len(seeds)):
        a, b = seeds[i], seeds[(i * 7 + 3) % len(seeds)]
        out.append(a + separators[i % len(separators)] + b)
    return out


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    prose = _prose()
    plain = prose + CODE + NUMBERS + EMOJI + WHITESPACE + EDGE
    texts = plain + _variations(prose + NUMBERS[:12] + EMOJI[:6]) + _mixes(plain) + SPECIAL
    seen, unique = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            unique.append(t)
    return tuple(unique)


def corpus() -> list[str]:
    """The corpus texts, in a fixed order (special-token texts last)."""
    return list(_corpus())


texts = corpus  # the name the validator looks up first


def english_text(min_bytes: int) -> str:
    """English prose and code of at least `min_bytes` utf-8 bytes, for benchmarks."""
    block = "\n\n".join(PROSE["en"] + [t for t in CODE if t.isascii()] + NUMBERS[:30])
    reps = min_bytes // len(block.encode("utf-8")) + 1
    return "\n\n".join(f"{i}. {block}" for i in range(reps))
