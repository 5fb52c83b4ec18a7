"""Models npllama does not implement are refused, not approximated: a GGUF asking for rope
scaling other than Llama 3.1's (which comes as rope_freqs.weight), an HF config with another
activation or biases. And out-of-range arguments of convert and plot are one line."""
import numpy as np
import pytest

from npllama import cli
from npllama.errors import CheckpointError, ConfigError, UsageError
from npllama.inspect import plot
from npllama.io.formats.gguf_file import gguf_args
from npllama.io.formats.hf import hf_config_to_args


class Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class Reader:
    """The part of gguf.GGUFReader that gguf_args reads: its metadata fields."""

    def __init__(self, **extra):
        meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": 97,
                "llama.feed_forward_length": 128, "tokenizer.ggml.tokens": ["a"] * 97}
        self.fields = {k: Field(v) for k, v in {**meta, **extra}.items()}


def test_a_gguf_without_rope_scaling_reads():
    assert gguf_args(Reader(), "m.gguf").dim == 64


@pytest.mark.parametrize("extra", [{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
                                   {"llama.rope.scaling.type": "yarn"}, {"llama.rope.scaling.factor": 8.0}])
def test_a_gguf_asking_for_other_rope_scaling_is_refused(extra):
    # llama.cpp would rotate every position differently: running it unscaled is a wrong answer
    with pytest.raises(CheckpointError, match=r"m.gguf: rope scaling .* is not supported"):
        gguf_args(Reader(**extra), "m.gguf")


@pytest.mark.parametrize("key,value", [("llama.expert_count", 8), ("llama.attention.sliding_window", 16),
                                       ("llama.logit_scale", 0.5)])
def test_a_gguf_of_a_llama_variant_is_refused(key, value):
    # A Mixtral (experts), sliding-window attention or scaled logits: each changes the answer
    assert gguf_args(Reader(**{key: 0 if key != "llama.logit_scale" else 1.0}), "m.gguf").dim == 64
    with pytest.raises(CheckpointError, match=f"m.gguf: {key} {value} is a variant npllama does not implement"):
        gguf_args(Reader(**{key: value}), "m.gguf")


CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 97, "intermediate_size": 128, "hidden_act": "silu"}


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True)])
def test_an_hf_config_of_another_variant_is_refused(key, value):
    assert hf_config_to_args(dict(CONFIG), "config.json").dim == 64
    with pytest.raises(ConfigError, match=f"config.json: {key} .* is not Llama's"):
        hf_config_to_args({**CONFIG, key: value}, "config.json")


@pytest.mark.parametrize("size", ["nan", "inf", "-1", "0", "1e-30", "x"])
def test_convert_shard_size_out_of_range_is_one_line(size, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "a.gguf", "out", "--shard-size", size])
    assert e.value.code == 2 and "argument --shard-size" in capsys.readouterr().err


def test_plot_of_scores_that_do_not_match_the_tokens_is_one_line(tmp_path):
    trace = {"tokens": np.arange(3), "layers.0.probs": np.zeros((2, 5, 5), np.float32)}
    with pytest.raises(UsageError, match=r"t.npz: layers.0.probs has shape \(2, 5, 5\), not \(n_heads, T, T\) "
                                         r"for its 3 tokens"):
        plot.attention(trace, 0, str(tmp_path / "x.png"), source="t.npz")
