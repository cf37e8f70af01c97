import pytest

from inference.sampling_params import SamplingParams
from inference.stop import StopChecker, append_batch

# A tiny byte-level tokenizer: ids 8/9 are the two bytes of "é" (U+00E9 = C3 A9).
EOS, STOP_TOK = 0, 11
VOCAB = {0: b"</s>", 1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\n", 6: b"##", 7: b"#",
         8: b"\xc3", 9: b"\xa9", 10: b"END", 11: b"<stop>"}
SPECIAL = {EOS, STOP_TOK}


def make_decode(skip_special_tokens=True):
    def decode(ids):
        pieces = [VOCAB[i] for i in ids if not (skip_special_tokens and i in SPECIAL)]
        return b"".join(pieces).decode("utf-8", errors="replace")
    return decode


def run(tokens, eos=EOS, skip_special_tokens=True, **kwargs):
    """Feeds tokens until the checker finishes; returns the checker."""
    c = StopChecker(SamplingParams(**kwargs), eos, make_decode(skip_special_tokens))
    for t in tokens:
        if c.append(t):
            break
    return c


def test_length():
    c = run([1, 2, 3, 4, 5], max_tokens=4)
    assert (c.finish_reason, c.stop_reason, c.text) == ("length", None, "Hello world")
    assert c.token_ids == [1, 2, 3, 4]


def test_not_finished_yet():
    c = run([1, 2], max_tokens=4)
    assert not c.finished and c.finish_reason is None and c.text == "Hello"


def test_eos_stops_and_is_hidden():
    c = run([1, 2, EOS, 3], skip_special_tokens=False)
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", None, "Hello")
    assert c.token_ids == [1, 2, EOS]


def test_eos_list():
    c = run([1, 10, 2], eos=[10, 0])
    assert (c.finish_reason, c.text) == ("stop", "Hel")


def test_ignore_eos():
    c = run([1, EOS, 2, EOS], ignore_eos=True, max_tokens=4)
    assert (c.finish_reason, c.text) == ("length", "Hello")


def test_stop_token_ids():
    c = run([1, 2, STOP_TOK, 3], stop_token_ids=[STOP_TOK], skip_special_tokens=False)
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", STOP_TOK, "Hello")
    c = run([1, 2, STOP_TOK], stop_token_ids=[STOP_TOK], skip_special_tokens=False,
            include_stop_str_in_output=True)
    assert c.text == "Hello<stop>"
    # stop_token_ids still apply with ignore_eos.
    assert run([1, 4], stop_token_ids=[4], ignore_eos=True).stop_reason == 4


def test_stop_string_across_token_boundary():
    c = run([1, 2, 3, 4], stop="lo wor")
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", "lo wor", "Hel")
    assert c.token_ids == [1, 2, 3]
    c = run([1, 2, 3, 4], stop="lo wor", include_stop_str_in_output=True)
    assert c.text == "Hello wor"


def test_stop_string_inside_a_token_truncates_the_rest():
    c = run([1, 2, 3], stop=["o w"])
    assert c.text == "Hell"
    c = run([1, 2, 3], stop=["o w"], include_stop_str_in_output=True)
    assert c.text == "Hello w"


def test_earliest_stop_string_wins():
    c = run([1, 2, 3, 4], stop=["world", "o wo", "xyz"])
    assert (c.stop_reason, c.text) == ("o wo", "Hell")


def test_min_tokens():
    # eos before min_tokens is ignored (the sampler normally bans it); so are stop strings and ids.
    c = run([EOS, 1, 4, 2, 3], min_tokens=2, stop_token_ids=[4], stop="Hel")
    assert (c.finish_reason, c.stop_reason) == ("stop", 4)
    assert c.token_ids == [EOS, 1, 4] and c.text == "Hel"
    # A stop string completed inside the window does not fire later; a new one does.
    c = run([7, 1, 7, 2], min_tokens=2, stop="#")
    assert (c.finish_reason, c.text, c.token_ids) == ("stop", "#Hel", [7, 1, 7])
    # The token right after the window may stop.
    assert run([1, 1, EOS], min_tokens=2).finish_reason == "stop"
    assert run([1, EOS, 1], min_tokens=2, max_tokens=3).finish_reason == "length"


def test_stop_beats_length_on_the_last_token():
    assert run([1, EOS], max_tokens=2).finish_reason == "stop"
    c = run([1, 2], stop="lo", max_tokens=2)
    assert (c.finish_reason, c.text) == ("stop", "Hel")


def test_multibyte_utf8_split_over_tokens():
    c = StopChecker(SamplingParams(stop="é", max_tokens=10), EOS, make_decode())
    c.append(1)
    c.append(8)                  # first byte only: decodes to U+FFFD, held back
    assert c.text == "Hel" and not c.finished
    assert c.append(9) == "stop"  # completes "é", which is the stop string
    assert (c.stop_reason, c.text) == ("é", "Hel")
    # Without a stop string the character comes through whole.
    c = run([1, 8, 9, 2], max_tokens=4)
    assert c.text == "Helélo"
    # An incomplete tail at the end of generation is returned as decoded.
    assert run([1, 8], max_tokens=2).text == "Hel\ufffd"


def test_streaming_text_holds_back_partial_stop_string():
    c = StopChecker(SamplingParams(stop="##x", max_tokens=10), EOS, make_decode())
    c.append(1)
    c.append(7)
    assert c.text == "Hel"       # "#" could start "##x"
    c.append(6)
    assert c.text == "Hel#"      # "###" ends in "##", which could start "##x"
    c.append(2)
    assert c.text == "Hel###lo" and not c.finished


def test_append_after_finish_raises():
    c = run([1], max_tokens=1)
    with pytest.raises(RuntimeError):
        c.append(2)


# -- incremental detokenization against a full decode of every prefix ----------------------------

def _reference(decode, ids, stops):
    """The checker's contract computed the slow way: decode every prefix in full.
    Returns (number of ids consumed, visible text) for a run with `stops` and no max_tokens cut."""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n]).rstrip("\ufffd")
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            return n, text[:min(hits)[0]]
    return len(ids), decode(ids)


def _check_against_full_decode(decode, ids, stops):
    c = StopChecker(SamplingParams(stop=stops or None, max_tokens=len(ids), ignore_eos=True), None, decode)
    for i, t in enumerate(ids):
        if c.append(t):
            break
        if not stops:  # streaming text: everything complete so far
            assert c.text == decode(ids[:i + 1]).rstrip("\ufffd")
    assert (len(c.token_ids), c.text) == _reference(decode, ids, stops)


def test_incremental_detok_equals_full_decode_on_split_utf8():
    # Byte tokens 8/9 split "é"; interleaved with whole tokens in every order.
    rng = __import__("random").Random(0)
    decode = make_decode()
    for _ in range(200):
        ids = [rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 8, 10]) for _ in range(rng.randint(1, 25))]
        _check_against_full_decode(decode, ids, [])
        _check_against_full_decode(decode, ids, rng.sample(["é", "lo", "o w", "#é", "\ufffd", "ENDH"], 2))


def test_incremental_detok_real_tokenizer(default_model):
    """The default model's byte-level BPE: text with multi-byte characters split over byte tokens,
    plus random vocabulary ids; stop strings taken from the text so that they span token boundaries."""
    import numpy as np

    tok = default_model[2]
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    text = "Grüße aus Köln — naïve café 日本語のテキスト 🎉🚀 emoji, ümlauts and ½ fractions."
    base = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in base), "no token splits a character: test is vacuous"
    rng = np.random.default_rng(0)
    for trial in range(30):
        ids = list(base)
        for _ in range(8):  # splice in random vocabulary ids
            ids.insert(int(rng.integers(0, len(ids))), int(rng.integers(0, tok.vocab_size)))
        full = decode(ids)
        start = int(rng.integers(0, max(1, len(full) - 6)))
        stop = full[start:start + int(rng.integers(2, 6))].replace("\ufffd", "")
        _check_against_full_decode(decode, ids, [])
        if stop:
            _check_against_full_decode(decode, ids, [stop])


def test_append_batch_equals_append_one_by_one():
    """The engine's batched stop checks (all rows' decodes in one call) give what `append` gives row by
    row: reasons, stop reasons and texts, on split UTF-8, stop ids, eos, min_tokens and skip flags."""
    rng = __import__("random").Random(1)
    calls = []

    def decode_batch(seqs, skip):
        calls.append(len(seqs))
        return [make_decode(skip)(ids) for ids in seqs]

    for _ in range(40):
        kws = [dict(stop=rng.sample(["é", "lo", "o w", "#é", "##", "ENDH"], rng.randint(0, 2)) or None,
                    max_tokens=rng.randint(3, 20), min_tokens=rng.choice([0, 0, 3]),
                    stop_token_ids=rng.choice([[], [STOP_TOK]]), skip_special_tokens=rng.random() < 0.7,
                    include_stop_str_in_output=rng.random() < 0.3, ignore_eos=rng.random() < 0.5)
               for _ in range(6)]
        single = [StopChecker(SamplingParams(**kw), EOS, make_decode(kw["skip_special_tokens"])) for kw in kws]
        batched = [StopChecker(SamplingParams(**kw), EOS, make_decode(kw["skip_special_tokens"])) for kw in kws]
        for _ in range(20):
            live = [i for i, c in enumerate(single) if not c.finished]
            if not live:
                break
            tokens = [rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 8, 10, 11]) for _ in live]
            expected = [single[i].append(t) for i, t in zip(live, tokens)]
            assert append_batch([batched[i] for i in live], tokens, decode_batch) == expected
            for i in live:
                a, b = single[i], batched[i]
                assert (a.finish_reason, a.stop_reason, a.text, a.token_ids) == \
                       (b.finish_reason, b.stop_reason, b.text, b.token_ids)
    assert max(calls) > 1  # several rows per decode call


@pytest.mark.parametrize("cut", range(6))
def test_restore_undoes_appends_as_if_they_never_happened(cut):
    """A rolled-back step restores the checker from a snapshot; feeding the same tokens again must end
    exactly where an uninterrupted checker does (text, reasons, stop found across the cut)."""
    tokens = [1, 8, 9, 2, 6, 7, 3, 4, 10, 5]  # "Helé" split over UTF-8 bytes, then "##", "#" ...
    kw = dict(stop=["###", "END"], max_tokens=9)
    reference = run(tokens, **kw)
    assert reference.stop_reason == "###" and cut < len(reference.token_ids)
    c = StopChecker(SamplingParams(**kw), EOS, make_decode())
    for t in tokens[:cut]:
        c.append(t)
    saved = c.snapshot()
    for t in tokens[cut:cut + 3]:  # the step that is undone (may even finish the request)
        if c.append(t):
            break
    c.restore(saved)
    assert c.token_ids == tokens[:cut] and not c.finished
    for t in tokens[cut:]:
        if c.append(t):
            break
    assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (
        reference.token_ids, reference.text, reference.finish_reason, reference.stop_reason)
