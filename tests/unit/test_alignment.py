"""Matching a conversation's text against stored token ids keeps the stored ids (and their KV):
a special token the client's copy of an answer skipped, and a character whose bytes span tokens,
do not cut the match short."""

from session.alignment import Aligner


def test_a_pad_token_the_answer_text_skipped_stays_in_the_match(tiny_tokenizer):
    a = Aligner(tiny_tokenizer)
    prompt, answer = a.tokenize("user: hi\nassistant:", False), a.tokenize(" fine thanks, and you", False)
    pad = tiny_tokenizer.pad_token_id
    stored = prompt + answer[:2] + [pad] + answer[2:]
    shown = tiny_tokenizer.decode(stored, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    ids, matched = a.align(shown + "\nuser: more", stored)
    assert matched == len(stored) and ids[:matched] == stored
    assert tiny_tokenizer.decode(ids[matched:]) == "\nuser: more"


def test_a_character_split_across_tokens_does_not_stop_the_search(tiny_tokenizer):
    a = Aligner(tiny_tokenizer)
    text = "a café with crème brûlée 🐈 and more words after the cat"
    byte_ids = [tiny_tokenizer.convert_tokens_to_ids(t) for t in tiny_tokenizer.tokenize("🐈")]
    assert len(byte_ids) > 1  # the emoji's bytes are several tokens
    stored = a.tokenize("a café with crème brûlée ", False) + byte_ids + a.tokenize(" and more", False)
    ids, matched = a.align(text, stored)
    assert matched == len(stored)
    assert tiny_tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text


def test_a_special_token_the_answer_skipped_is_skipped_even_where_the_template_shows_it(tiny_tokenizer):
    """The conversation's text shows <|im_start|> at every turn, but the answer's copy of one the
    model emitted is gone (answers are decoded without special tokens): the match goes past it."""
    a = Aligner(tiny_tokenizer)
    start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    prompt = a.tokenize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False)
    answer = a.tokenize("fine thanks, and you", False)
    stored = prompt + answer[:2] + [start] + answer[2:]
    shown = a.text_of(prompt) + tiny_tokenizer.decode(answer, skip_special_tokens=True,
                                                      clean_up_tokenization_spaces=False)
    ids, matched = a.align(shown + "<|im_end|>\n<|im_start|>user\nmore", stored)
    assert matched == len(stored) and ids[:matched] == stored
    assert a.text_of(ids[matched:]) == "<|im_end|>\n<|im_start|>user\nmore"
