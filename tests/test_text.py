"""Sentence splitting for streamed text."""

from wyoming_cosyvoice.text import SentenceSplitter, split_sentences


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
