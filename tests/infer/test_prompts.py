"""A1111 prompt syntax, checked against A1111's documented examples and its formulas."""

from __future__ import annotations

import pytest
import torch

from loracraft.infer.errors import UsageError
from loracraft.infer.prompts import (
    BREAK,
    LoraTag,
    apply_emphasis,
    build_chunks,
    extract_lora_tags,
    parse_emphasis,
)


# The examples of A1111's ``parse_prompt_attention`` docstring (modules/prompt_parser.py).
@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
        ),
        ("[dim] and [[dimmer]]", [("dim", 1 / 1.1), (" and ", 1.0), ("dimmer", 1 / 1.1 / 1.1)]),
        ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
        ("stray) closer", [("stray closer", 1.0)]),
        ("", [("", 1.0)]),
    ],
)  # fmt: skip
def test_parse_emphasis_matches_a1111_examples(text, expected):
    got = parse_emphasis(text)
    assert [f for f, _ in got] == [f for f, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    "prompt, text, tags",
    [
        ("a cat <lora:mystyle:0.7>", "a cat", [LoraTag("mystyle", 0.7, 0.7)]),
        ("<lora:a>a cat", "a cat", [LoraTag("a", 1.0, 1.0)]),
        ("x <lora:a:0.5:1.2>, y", "x, y", [LoraTag("a", unet=1.2, text_encoder=0.5)]),  # TE first, then UNet
        ("x <lora:a:te=0.2:unet=0.9>", "x", [LoraTag("a", 0.9, 0.2)]),
        ("x <LoRA:a:1> <lyco:b:-1>", "x", [LoraTag("a", 1.0, 1.0), LoraTag("b", -1.0, -1.0)]),
        ("no tags (here:1.2)", "no tags (here:1.2)", []),
    ],
)
def test_extract_lora_tags(prompt, text, tags):
    assert extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize("prompt", ["<lora::1>", "<lora:a:abc>", "<lora:a:nan>", "<lora:a:foo=1>"])
def test_bad_lora_tags_are_usage_errors(prompt):
    with pytest.raises(UsageError) as e:
        extract_lora_tags(prompt)
    assert "\n" not in str(e.value) and "--prompt" in str(e.value)


def test_chunks_are_75_tokens_wrapped_in_bos_eos_and_padded():
    def tokenize(text):  # one token per character: ids 10.. for 'a'..
        return [10 + ord(c) - ord("a") for c in text]

    frags = [("a" * 70, 1.0), ("b" * 10, 1.5)]
    chunks = build_chunks(frags, tokenize, bos=1, eos=2, pad=0, min_chunks=3)
    assert len(chunks) == 3 and all(len(c.ids) == len(c.weights) == 77 for c in chunks)
    first, second, empty = chunks
    assert first.ids == [1] + [10] * 70 + [11] * 5 + [2]
    assert first.weights == [1.0] + [1.0] * 70 + [1.5] * 5 + [1.0]
    assert second.ids == [1] + [11] * 5 + [2] + [0] * 70  # padding after EOS with the pad token
    assert second.weights == [1.0] + [1.5] * 5 + [1.0] * 71
    assert empty.ids == [1, 2] + [0] * 75
    broken = build_chunks([("ab", 1.0), BREAK, ("c", 1.0)], tokenize, bos=1, eos=2, pad=2)
    assert [c.ids[:4] for c in broken] == [[1, 10, 11, 2], [1, 12, 2, 2]]


def test_emphasis_scales_tokens_then_restores_the_mean():
    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.3
    w = [1.0] * 77
    w[5] = 1.5
    w[6] = 0.5
    out = apply_emphasis(z, w)
    scaled = z.clone()
    scaled[0, 5] *= 1.5
    scaled[0, 6] *= 0.5
    expected = scaled * (z.mean() / scaled.mean())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.mean(), z.mean())
    assert apply_emphasis(z, [1.0] * 77) is z  # no weights: untouched, bit for bit


def test_a_full_window_moves_the_words_after_a_late_comma_to_the_next():
    # A1111's comma_padding_backtrack (default 20): ids 10 = 'a', 11 = 'b', 99 = ','
    def tokenize(text):
        return [99 if c == "," else 10 + ord(c) - ord("a") for c in text]

    text = "a" * 60 + "," + "b" * 20  # the comma at 61 is 14 tokens before the window's end
    first, second = build_chunks([(text, 1.0)], tokenize, bos=1, eos=2, pad=0, comma=99)
    assert first.ids == [1] + [10] * 60 + [99, 2] + [0] * 14
    assert second.ids[:22] == [1] + [11] * 20 + [2]
    far = "a" * 40 + "," + "b" * 40  # comma 34 tokens back: too far, cut at 75 as usual
    first, second = build_chunks([(far, 1.0)], tokenize, bos=1, eos=2, pad=0, comma=99)
    assert first.ids == [1] + [10] * 40 + [99] + [11] * 34 + [2]
    plain = build_chunks([(text, 1.0)], tokenize, bos=1, eos=2, pad=0)  # no comma token: plain cut
    assert plain[0].ids[-2:] == [11, 2]
