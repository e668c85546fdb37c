"""Feature absorption: planted in a synthetic dictionary, found; first-letter labels."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from saesweep.collect.model import model_path
from saesweep.evaluate.absorption import (
    LETTERS,
    AbsorptionConfig,
    LabelledTokens,
    absorption_of,
    first_letters,
    make_task,
    sae_absorption,
)

D, N_LETTERS, WORDS = 96, 4, 20
"""Activation width; letters a-d; words per letter (token ids 100 + letter * WORDS + word)."""
ABSORBED = (100, 105)
"""Word tokens of letter a (ids divisible by 5: 2 of its 4 test words) whose own latent has
absorbed the letter: its decoder carries a's direction and a's latent is silent on them."""


def directions() -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal letter directions [4, D] and word directions [80, D]."""
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0]
    return basis[:N_LETTERS], basis[N_LETTERS : N_LETTERS + N_LETTERS * WORDS]


def tokens(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activations [n, D] = letter + word direction + noise, token ids, letter labels)."""
    gen = torch.Generator().manual_seed(1)
    u, v = directions()
    word = torch.randint(0, N_LETTERS * WORDS, (n,), generator=gen)
    letter = word // WORDS
    x = u[letter] + v[word] + 0.05 * torch.randn(n, D, generator=gen)
    return x, 100 + word, letter


def dictionary(absorbed: tuple[int, ...]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A ReLU SAE: latents 0-3 the letters, 4-83 the words; for the `absorbed` word ids the
    word latent's decoder is (letter a + word) and letter a's encoder is pushed below zero."""
    u, v = directions()
    w_enc, w_dec = torch.cat([u, v]).T.clone(), torch.cat([u, v]).clone()
    for token in absorbed:
        word = token - 100
        w_enc[:, 0] -= 2 * v[word]
        w_dec[N_LETTERS + word] = u[0] + v[word]
    d_sae = N_LETTERS * (1 + WORDS)
    cfg = {"architecture": "standard", "d_in": D, "d_sae": d_sae, "apply_b_dec_to_input": False}
    sd = {
        "W_enc": w_enc,
        "b_enc": torch.full((d_sae,), -0.3),
        "W_dec": w_dec,
        "b_dec": torch.zeros(D),
    }
    return cfg, sd


@pytest.fixture(scope="module")
def task():
    x, ids, letters = tokens()
    return make_task(x, ids, letters, AbsorptionConfig()), ids, letters


def test_planted_absorption_is_found(task):
    task, ids, letters = task
    assert task.letter_ok.nonzero().flatten().tolist() == [0, 1, 2, 3]
    found = sae_absorption(task, dictionary(ABSORBED), AbsorptionConfig())
    test_ids = ids[: len(task.x)][task.test]
    test_a = test_ids[letters[: len(task.x)][task.test] == 0]
    planted = float(torch.isin(test_a, torch.tensor(ABSORBED)).double().mean())
    assert 0.35 < planted < 0.65
    by_letter = found["absorption_by_letter"]
    assert by_letter["a"] == pytest.approx(planted, abs=0.01)
    assert [by_letter[c] for c in "bcd"] == [0.0, 0.0, 0.0]
    assert found["absorption"] == pytest.approx(planted / 4, abs=0.005)
    assert found["absorption_full"] == pytest.approx(planted / 4, abs=0.005)
    assert found["absorption_split_latents"] == 0
    assert found["absorption_letters"] == 4


def test_a_clean_dictionary_absorbs_nothing(task):
    found = sae_absorption(task[0], dictionary(()), AbsorptionConfig())
    assert found["absorption"] == 0.0
    assert found["absorption_full"] == 0.0
    assert found["absorption_letters"] == 4


def test_letters_without_enough_evidence_are_not_evaluated(task):
    x, ids, letters = tokens(400)
    strict = AbsorptionConfig(min_true_positives=1000)
    few = make_task(x, ids, letters, strict)
    found = sae_absorption(few, dictionary(ABSORBED), strict)
    assert found["absorption_letters"] == 0
    assert found["absorption"] != found["absorption"]
    assert found["absorption_reason"] == (
        "0 letters with a probe of F1 >= 0.6 and 1000 test true positives, over 400 alphabetic "
        "held-out tokens; 1 needed"
    )
    assert "absorption_reason" not in sae_absorption(task[0], dictionary(()), AbsorptionConfig())


def test_held_out_tokens_without_a_word_say_so():
    """Punctuation only: no token can be labelled, and the result says how many were read."""
    tokenizer = AutoTokenizer.from_pretrained(model_path("demo"))
    ids = torch.tensor(tokenizer.convert_tokens_to_ids([",", ".", "!", "?"]) * 50)
    x = torch.randn(len(ids), D, generator=torch.Generator().manual_seed(2))
    cfg, sd = dictionary(())

    def held_out(hooks):
        for hook in hooks:
            yield hook, LabelledTokens(x, ids, tokenizer)

    sae = (cfg | {"hook_name": "h"}, sd)
    (found,) = absorption_of([sae], held_out, AbsorptionConfig(), {"absorption_split": "val"})
    assert found == {
        "absorption_reason": "0 alphabetic tokens among 200 held-out tokens",
        "absorption_tokens": 0,
        "absorption_split": "val",
    }


def test_first_letters_of_decoded_tokens():
    tokenizer = AutoTokenizer.from_pretrained(model_path("demo"))
    words = ["apple", "zebra", "##ing", ",", "42", "the"]
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    got = first_letters(ids, tokenizer).tolist()
    assert got == [LETTERS.index("a"), LETTERS.index("z"), LETTERS.index("i"), -1, -1, 19]
