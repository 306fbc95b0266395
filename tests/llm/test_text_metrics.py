"""clpeft.text_metrics against hand-worked examples (rouge_score is not installed here)."""

import pytest

from clpeft.text_metrics import exact_match, label_word, lcs_length, rouge_l, score


def test_exact_match_ignores_outer_and_repeated_whitespace_but_not_case():
    assert exact_match("  85\n", "85") == 1.0
    assert exact_match("2  4 7", "2 4 7") == 1.0
    assert exact_match("bA", "ba") == 0.0
    assert exact_match("85.", "85") == 0.0


def test_lcs_by_hand():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (CLRS 15.4): BCBA
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["a", "b"], ["b", "a"]) == 1


def test_rouge_l_by_hand():
    # Lin 2004's example: reference "police killed the gunman"
    # S2 "police kill the gunman": LCS = police, the, gunman = 3 -> R = P = 3/4, F = 0.75
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # S3 "the gunman kill police": LCS = the gunman = 2 -> F = 0.5 (Lin: S2 better than S3)
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # unequal lengths: reference 3 tokens, answer 2, LCS 1: R = 1/3, P = 1/2, F = 2PR/(P+R) = 0.4
    assert rouge_l("cat the", "the cat sat") == pytest.approx(0.4)
    # tokens are lowercase alphanumeric runs: punctuation and case do not count
    assert rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("", "the cat") == 0.0 and rouge_l("dog", "the cat") == 0.0


def test_label_words_take_the_word_the_answer_starts_with():
    words = ("positive", "negative", "neg")
    assert label_word(" Negative, clearly.", words) == "negative"  # the longest matching word
    assert label_word("neutral", words) is None
    assert score("label_words", "Positive!", "positive", ("positive", "negative")) == 1.0
    assert score("label_words", "It is positive", "positive", ("positive", "negative")) == 0.0  # must start with it
    assert score("label_words", "negative", "positive", ("positive", "negative")) == 0.0
