import pytest
import torch

from llama2 import ModelArgs, Transformer


@pytest.mark.parametrize(
    ("preset", "params", "hidden"),
    [
        ("7B", 6_738_415_616, 11008),
        ("13B", 13_015_864_320, 13824),
        ("34B", 33_743_970_304, 22016),
        ("70B", 68_976_648_192, 28672),
    ],
)
def test_released_shapes(preset, params, hidden):
    args = ModelArgs.from_preset(preset)
    assert args.vocab_size == 32000
    assert args.hidden_dim == hidden
    assert args.num_params() == params


def test_num_params_matches_a_built_model():
    args = ModelArgs.from_preset("tiny")
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()


def test_preset_names_are_case_insensitive_and_overridable():
    assert ModelArgs.from_preset("7b").dim == 4096
    assert ModelArgs.from_preset("tiny", vocab_size=77).vocab_size == 77


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*7B"):
        ModelArgs.from_preset("huge")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dim=100, n_heads=3), "divisible by n_heads"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(norm_eps=0.0), "norm_eps must be positive"),
        (dict(dim=12, n_heads=4), "must be even"),
    ],
)
def test_invalid_args_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown model field"):
        ModelArgs.from_dict({"dim": 64, "n_heads": 4, "heads": 4})
    assert ModelArgs.from_dict(ModelArgs.from_preset("tiny").to_dict()) == ModelArgs.from_preset("tiny")
