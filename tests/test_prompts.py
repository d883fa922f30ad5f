import pytest

from sjc_jax import prompts


def test_view_prompts_follow_the_label_order():
    assert prompts.view_prompts("a hamburger") == (
        "front view of a hamburger",
        "side view of a hamburger",
        "backside view of a hamburger",
        "overhead view of a hamburger",
    )


def test_prefixes_are_indexed_by_label():
    texts = prompts.view_prompts("x")
    for label, prefix in enumerate(prompts.VIEW_PREFIXES):
        assert texts[label] == f"{prefix} x"


def test_view_augmentation_off_repeats_the_prompt():
    assert prompts.view_prompts("  a chair ", view_augmentation=False) == ("a chair",) * 4


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_prompt_refused(bad):
    with pytest.raises(ValueError, match="prompt is empty"):
        prompts.view_prompts(bad)


def test_non_string_prompt_refused():
    with pytest.raises(ValueError, match="prompt must be a string"):
        prompts.view_prompts(None)


def test_prefix_order_matches_camera_labels():
    from sjc_jax import camera

    assert prompts.VIEW_PREFIXES[camera.VIEW_FRONT] == "front view of"
    assert prompts.VIEW_PREFIXES[camera.VIEW_SIDE] == "side view of"
    assert prompts.VIEW_PREFIXES[camera.VIEW_BACK] == "backside view of"
    assert prompts.VIEW_PREFIXES[camera.VIEW_OVERHEAD] == "overhead view of"


@pytest.mark.parametrize(
    ("text", "width", "short"),
    [
        ("a hamburger", 40, "a hamburger"),
        ("  a\n hamburger \t on  a plate ", 40, "a hamburger on a plate"),
        ("a very detailed photo of a hamburger on a plate", 20, "a very detailed…"),
        ("supercalifragilisticexpialidocious", 10, "supercali…"),
    ],
)
def test_short_prompt(text, width, short):
    assert prompts.short_prompt(text, width) == short
    assert len(prompts.short_prompt(text, width)) <= width


def test_short_prompt_refuses_a_tiny_width():
    with pytest.raises(ValueError, match="width"):
        prompts.short_prompt("abc", width=3)


def test_a_prompt_longer_than_clip_reads_is_one_warning(tiny_sd_eps):
    import warnings

    from sjc_jax.diffusion import stable_diffusion as sd

    components = sd.load_components(tiny_sd_eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd.view_conditioning(components, "a hamburger")  # short: no warning
    long = "a hamburger " * 8  # the tiny tokenizer reads characters: 96 tokens
    with pytest.warns(UserWarning) as record:
        sd.view_conditioning(components, long)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "CLIP reads 77 tokens and 4 prompt text(s) are longer" in messages[0]
    assert "view of a hamburger" in messages[0] and " loses " in messages[0]
