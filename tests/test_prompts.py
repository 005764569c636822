"""Bad input: clear errors naming the prompt index, never a crash deep in torch."""
import pytest

from prepack_actor import Engine, ModelLoadError, PromptError, SamplingParams, load_model


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    model, tok = load_model(tiny_model_dir("gpt2"), dtype="float32", device="cpu")
    return Engine(model, tok)


def test_empty_list_gives_empty_result(engine):
    assert engine.generate([]) == []
    assert engine.prefill([]).shape[0] == 0


@pytest.mark.parametrize("bad, reason", [
    ("", "empty prompt"),
    (None, "expected a string or a list of token ids, got NoneType"),
    (5, "expected a string or a list of token ids, got int"),
    ([], "empty prompt"),
    ([1, 10**9], "outside the vocabulary"),
    ("word " * 3000, "exceed the model's context of 2048"),
])
def test_bad_prompt_names_index_and_reason(engine, bad, reason):
    with pytest.raises(PromptError, match=reason) as e:
        engine.generate(["fine", "also fine", bad])
    assert e.value.index == 2 and str(e.value).startswith("prompt 2:")


def test_room_for_new_tokens_is_checked(engine):
    ids = [5] * 2040
    engine.prefill([ids])  # fits the 2048 context by itself
    with pytest.raises(PromptError, match=r"2040 prompt tokens \+ 16 new tokens exceed"):
        engine.generate([ids], SamplingParams(max_new_tokens=16))


def test_single_string_is_rejected(engine):
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("not a list")


def test_unloadable_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model from"):
        load_model(str(tmp_path / "missing"), device="cpu")
