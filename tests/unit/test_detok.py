from model.detok import IncrementalDetokenizer


def test_stream_equals_full_decode_and_never_splits_characters(tiny_tokenizer):
    text = "Grüße — naïve café 日本語 😀 and plain words."
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tiny_tokenizer, [tiny_tokenizer.bos_token_id])
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_character_held_until_complete(tiny_tokenizer):
    # Byte-level tokens of one 4-byte emoji, fed one byte-token at a time.
    byte_ids = [tiny_tokenizer.convert_tokens_to_ids(t) for t in ["ð", "Ł", "ĺ", "Ģ"]]
    assert tiny_tokenizer.decode(byte_ids) == "😀"
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    out = [detok.push(i) for i in byte_ids]
    assert out == ["", "", "", "😀"]
