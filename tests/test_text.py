"""Sentence splitting for streamed text."""

from wyoming_cosyvoice.text import SentenceSplitter, count_words, split_sentences


def test_sentences_complete_only_after_whitespace() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello world.") == []
    assert splitter.feed(" How are") == ["Hello world."]
    assert splitter.feed(" you? Fine") == ["How are you?"]
    assert splitter.flush() == "Fine"
    assert splitter.flush() == ""


def test_numbers_and_abbreviations_stay_whole() -> None:
    assert split_sentences("Pi is 3.14 roughly. Dr. Smith arrived, e.g. today! Done") == [
        "Pi is 3.14 roughly.",
        "Dr. Smith arrived, e.g. today!",
        "Done",
    ]


def test_dotted_abbreviations_do_not_end_a_sentence() -> None:
    assert split_sentences("Wir haben z.B. einen Hund, d.h. viel Arbeit. In the U.S. it is fine.") == [
        "Wir haben z.B. einen Hund, d.h. viel Arbeit.",
        "In the U.S. it is fine.",
    ]


def test_cjk_and_newlines() -> None:
    assert split_sentences("希望你以后能够做的比我还好呦。你好！\nline two\n\nthree") == [
        "希望你以后能够做的比我还好呦。",
        "你好！",
        "line two",
        "three",
    ]


def test_split_mid_word_chunks() -> None:
    splitter = SentenceSplitter()
    out = []
    for piece in ["Hel", "lo wor", "ld. The sec", "ond one", ".", " "]:
        out += splitter.feed(piece)
    assert out == ["Hello world.", "The second one."]
    assert splitter.flush() == ""


def test_quotes_after_terminator() -> None:
    assert split_sentences('He said "stop." Then left.') == ['He said "stop."', "Then left."]


# ---------------------------------------------------------------- the first piece of a stream ends at a clause

LONG_FIRST = (
    "The weather in the living room is warm and pleasant, so I will keep the heating as it is tonight. "
    "Tomorrow it gets colder, and the heating goes on at six. Good night."
)
TEXTS = [
    LONG_FIRST,
    "Hi, there. One two three four five, six. And more, more, more words, here.",
    "It costs 1,000 dollars and 3,5 euros for us all, e.g., today and i.e., tomorrow, or so.",
    "Wie z.B., ein Haus oder z. B., eine Hütte, ist es gut, sagte er.",
    "It was a very dark night indeed - and then it rained; nobody came.",
    'He said "one two three four five," and left. Dr. Smith, Jr., was not amused, really.',
    "希望你以后能够做的比我还好呦，真的。你好！",
    "我们今天去公园、博物馆和图书馆，然后回家。",
    "Line one has no comma at all\nbut line two, with more words, does.",
]


def pieces(text: str, sizes: list[int], words: int = 5) -> list[str]:
    """Feed `text` in chunks of the given sizes (cycled), flush, and return every piece."""
    splitter = SentenceSplitter(first_clause_words=words)
    out: list[str] = []
    at, i = 0, 0
    while at < len(text):
        out += splitter.feed(text[at : at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    rest = splitter.flush()
    return out + ([rest] if rest else [])


def assert_covers(text: str, parts: list[str]) -> None:
    """`parts` are `text` in order, with nothing but white space left out between them."""
    at = 0
    for part in parts:
        found = text.index(part, at)
        assert not text[at:found].strip(), (text, parts)
        at = found + len(part)
    assert not text[at:].strip(), (text, parts)


def test_first_piece_ends_at_the_first_clause_with_enough_words() -> None:
    assert pieces(LONG_FIRST, [len(LONG_FIRST)]) == [
        "The weather in the living room is warm and pleasant,",
        "so I will keep the heating as it is tonight.",
        "Tomorrow it gets colder, and the heating goes on at six.",  # later sentences stay whole
        "Good night.",
    ]


def test_pieces_do_not_depend_on_how_the_text_is_chunked() -> None:
    for text in TEXTS:
        whole = pieces(text, [len(text)])
        assert_covers(text, whole)
        for cut in range(1, len(text)):  # every split position of two chunks
            assert pieces(text, [cut, len(text)]) == whole, (text, cut)
        for sizes in ([1], [2], [3], [4], [7], [1, 5, 2], [13, 1]):
            assert pieces(text, sizes) == whole, (text, sizes)


def test_clause_marks() -> None:
    words = "one two three four five"
    for mark in (",", ";", ":", " -", " –", " —", " --"):
        assert pieces(f"{words}{mark} six seven.", [1])[0] == f"{words}{mark}", mark
    for mark in ("，", "、", "；", "："):
        assert pieces(f"一二三四五{mark}六七。", [1]) == [f"一二三四五{mark}", "六七。"], mark
    assert pieces('One two three four "five", six.', [1])[0] == 'One two three four "five",'
    assert pieces("他说了一句话：「好的，」然后走了。", [1])[0] == "他说了一句话："


def test_numbers_and_abbreviations_are_never_cut() -> None:
    for text in (
        "One two three four costs 3,5 euros today.",
        "One two three four five costs 1,000 dollars.",
        "We saw many big animals e.g., lions and tigers.",
        "We saw many big animals i.e., lions and tigers.",
        "Wir sahen viele große Tiere z.B., Löwen und Tiger.",
        "Wir sahen viele große Tiere z.B. Löwen und Tiger.",
        "Between one two three 3 - 5 people came along.",
        "The meeting starts at 10:30 in the big hall today.",
        "One two three four five,six seven eight.",  # no white space after the mark
    ):
        assert pieces(text, [1]) == [text], text


def test_no_decision_before_the_next_character_arrives() -> None:
    splitter = SentenceSplitter(first_clause_words=5)
    assert splitter.feed("It costs us about 1,") == []
    assert splitter.feed("000 dollars, or so") == ["It costs us about 1,000 dollars,"]
    splitter = SentenceSplitter(first_clause_words=5)
    assert splitter.feed("One two three four five,") == []
    assert splitter.feed(" six") == ["One two three four five,"]
    assert splitter.feed(" seven. Eight, nine") == ["six seven."]
    assert splitter.flush() == "Eight, nine"
    splitter = SentenceSplitter(first_clause_words=5)
    assert splitter.feed("一二三四五，") == []  # a closing quote might follow
    assert splitter.feed("六") == ["一二三四五，"]


def test_short_first_clauses_behave_as_before() -> None:
    for text in (
        "Yes, sure. Turn on the lights, please.",
        "Okay, the kitchen light is on now. Anything else, maybe the hall?",
        "好的，马上。还有别的吗？",
        "No commas in this rather long first sentence at all. Then one, two.",
    ):
        assert pieces(text, [1]) == pieces(text, [1], words=0) == split_sentences(text), text


def test_only_the_first_piece_and_off_by_default() -> None:
    text = "Sure. " + LONG_FIRST
    assert pieces(text, [3]) == split_sentences(text)  # the first piece was a whole sentence
    assert pieces(LONG_FIRST, [3], words=0) == split_sentences(LONG_FIRST)
    assert split_sentences(LONG_FIRST)[0].endswith("tonight.")  # one-shot text is unchanged


def test_word_threshold_and_cjk_counting() -> None:
    assert count_words("Don't stop, e.g. 1,000 well-known cats") == 6
    assert count_words("希望你以后") == 5 and count_words("我用iPhone拍照") == 5
    text = "One two three, four five six seven, eight nine."
    assert pieces(text, [1], words=3)[0] == "One two three,"
    assert pieces(text, [1], words=4)[0] == "One two three, four five six seven,"
    assert pieces(text, [1], words=8) == [text]


def test_flush_starts_a_new_stream() -> None:
    splitter = SentenceSplitter(first_clause_words=5)
    assert splitter.feed("One two three four five, six. Seven") == ["One two three four five,", "six."]
    assert splitter.flush() == "Seven"
    assert splitter.feed("Eight nine ten eleven twelve, thirteen") == ["Eight nine ten eleven twelve,"]


def test_a_word_ending_in_a_combining_mark_ends_a_clause() -> None:
    """Hindi vowel signs and decomposed Latin accents are combining marks, which `\\w` leaves out."""
    hindi = "मैं आज बाज़ार जाऊँगा और सब्ज़ी लूँगी, फिर घर आऊँगी।"  # "लूँगी" ends in the vowel sign "ी"
    assert count_words("मैं आज बाज़ार जाऊँगा और सब्ज़ी लूँगी") == 7
    latin = "Je suis alle\u0301 au marche\u0301 ce matin, puis je suis rentre\u0301."  # NFD: e + U+0301
    for text, head in (
        (hindi, "मैं आज बाज़ार जाऊँगा और सब्ज़ी लूँगी,"),
        (latin, "Je suis alle\u0301 au marche\u0301 ce matin,"),
    ):
        for sizes in ([len(text)], [1], [3], [1, 5, 2]):
            parts = pieces(text, sizes)
            assert parts[0] == head, (text, sizes)
            assert_covers(text, parts)
    assert pieces("Il a de\u0301ja\u0300 vu cinq films cre\u0301e\u0301s - puis rien.", [1])[0].endswith(" -")
