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
