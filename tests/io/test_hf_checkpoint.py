"""An HF checkpoint as users hold one (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json; no tokenizer.model):
a random Llama 3.1-shaped model saved by transformers' save_pretrained, run with `-m FOLDER`
and compared with transformers' own generate."""
import os
import shutil
import subprocess
import sys

import pytest
from gguf import GGUFReader

import npllama
from npllama.io import hub
from npllama.run.generate import Generator
from npllama.text.tokenizer import chat_format, load as load_tokenizer
from oracles import llama31_instruct_tokenizer_dir

pytestmark = [pytest.mark.torch, pytest.mark.network]

PROMPT = "What is the capital of France?"
NEW_TOKENS = 16


def run(*argv, env):
    return subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("hf") / "Tiny-Llama-3.1-Instruct"
    cfg = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_id=[128001, 128008, 128009],
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # scaled like a trained model, so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(path)
    llama31_instruct_tokenizer_dir(str(path))
    assert not any(f.endswith(".model") for f in os.listdir(path))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, NPLLAMA_CACHE=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
    """transformers' chat prompt and greedy continuation (its generation_config's stops)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                     return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):]
    new = [t for t in out.tolist() if t not in (128001, 128008, 128009)]  # the stop token ends it, unprinted
    return dict(prompt=prompt, tokens=new, text=tok.decode(new, clean_up_tokenization_spaces=False),
                n_params=sum(p.numel() for p in model.parameters()))


def test_cli_generate_on_the_hf_folder_equals_transformers(hf_dir, env, hf_reference):
    r = run("generate", "-m", str(hf_dir), PROMPT, "--max-new-tokens", str(NEW_TOKENS), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == hf_reference["text"] + "\n"
    # converted once into the cache, with the conversion's progress shown
    assert "npllama: converting" in r.stderr and "converted" in r.stderr and "\nconvert: 0.07 / 0.07 GB" in r.stderr
    assert len(r.stderr.splitlines()) < 10   # a summary, not a line for each of the 21 tensors
    again = run("generate", "-m", str(hf_dir), PROMPT, "--max-new-tokens", str(NEW_TOKENS), env=env)
    assert again.returncode == 0 and again.stdout == r.stdout
    assert "converting" not in again.stderr and "hashing" not in again.stderr


def test_tokens_equal_transformers(hf_dir, env, hf_reference, monkeypatch):
    monkeypatch.setenv("NPLLAMA_CACHE", env["NPLLAMA_CACHE"])
    path = hub.resolve_model(str(hf_dir))
    assert os.path.dirname(path) == os.path.join(env["NPLLAMA_CACHE"], "converted")
    tok = load_tokenizer(path)
    prompt = chat_format(tok).encode_dialog_prompt([{"role": "user", "content": PROMPT}])
    assert prompt == hf_reference["prompt"]
    res = Generator(npllama.load(path), tok).generate(prompt, max_new_tokens=NEW_TOKENS)
    assert res.tokens == hf_reference["tokens"]
    assert (res.stop_reason == "stop_token") == (len(res.tokens) < NEW_TOKENS)
    assert sorted(tok.stop_ids) == [128001, 128008, 128009]


def test_info_on_the_hf_folder(hf_dir, env, hf_reference):
    r = run("info", str(hf_dir), env=env)
    assert r.returncode == 0, r.stderr
    assert f"parameters: {hf_reference['n_params']:,}\n" in r.stdout
    assert "tokenizer: byte-level BPE, 128256 tokens, pre-tokenizer llama3" in r.stdout
    assert "chat format: the checkpoint's chat template" in r.stdout
    assert "(128009)" in r.stdout and "(128001)" in r.stdout and "(128008)" in r.stdout
    assert "trained context: 131072 tokens; runs at 131072 by default" in r.stdout


def test_an_edited_source_converts_again(hf_dir, env, tmp_path):
    src = tmp_path / "copy"
    shutil.copytree(hf_dir, src)
    first = run("info", str(src), env=env)
    assert first.returncode == 0 and "converting" in first.stderr
    (src / "generation_config.json").write_text('{"eos_token_id": [128001]}')
    second = run("info", str(src), env=env)
    assert second.returncode == 0 and "converting" in second.stderr
    assert "stops on: <|eot_id|> (128009), <|end_of_text|> (128001)\n" in second.stdout
    hashed = [line for line in second.stderr.splitlines() if "hashing" in line]
    assert len(hashed) == 1 and "(1 file, 0.00 GB)" in hashed[0]  # the others' digests are remembered


def test_folder_without_a_tokenizer_says_so(hf_dir, env, tmp_path):
    src = tmp_path / "weights-only"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(hf_dir / name, src / name)
    r = run("generate", "-m", str(src), "hi", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "has no tokenizer (tokenizer.json or tokenizer.model)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("no tokenizer.json or tokenizer.model (the checkpoint it was "
                                                      "converted from had no tokenizer)")


def test_bad_tokenizer_in_the_folder_is_one_line(hf_dir, env, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(hf_dir, src)
    (src / "tokenizer_config.json").write_text('{"eos_token": 5}')
    r = run("generate", "-m", str(src), "hi", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"npllama: {src / 'tokenizer_config.json'}: eos_token must be a " \
                                                "token string"


def test_gguf_file_with_m(env):
    """-m on a GGUF file: the default model's, converted into the cache under its own key."""
    gguf = os.path.join(hub.cache_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf")
    hub.fetch_gguf(gguf)
    r = run("info", gguf, env=env)
    assert r.returncode == 0, r.stderr
    reader = GGUFReader(gguf)
    eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    assert f"parameters: {sum(int(t.n_elements) for t in reader.tensors):,} (output head tied" in r.stdout
    assert "chat format: the checkpoint's chat template" in r.stdout and f"({eos})" in r.stdout
    assert f"trained context: {reader.fields['llama.context_length'].contents()} tokens" in r.stdout
    assert "pre-tokenizer smollm" in r.stdout
    assert os.path.isdir(os.path.join(env["NPLLAMA_CACHE"], "converted"))
