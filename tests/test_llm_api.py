"""The `LLM` facade on the default model: API shape, bad input, streaming, scoring, n > 1, close()."""

import dataclasses
import json

import numpy as np
import pytest

from inference import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_generate_returns_ids_text_finish_reason(default_llm):
    out = default_llm.generate(["The capital of France is"], GREEDY)[0]
    assert out.token_ids and isinstance(out.text, str) and out.finish_reason in ("stop", "length")
    assert out.text == default_llm.tokenizer.decode(out.token_ids)
    assert out.metrics.ttft is not None and out.metrics.ttft > 0


def test_logprobs_topk_per_generated_token(default_llm):
    out = default_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == len(out.token_ids)
    for entry, tok in zip(lps, out.token_ids):
        assert tok in entry and len(entry) >= 3
        assert entry[tok] == max(entry.values())  # greedy picks the top-1
        assert all(v <= 0 for v in entry.values())
    # The cumulative logprob sums the chosen tokens' entries; without logprobs it is None (as in vLLM)
    # and the step program skips the log-softmax, with the same tokens.
    c = out.outputs[0]
    assert c.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(lps, c.token_ids)), abs=1e-4)
    plain = default_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert plain.cumulative_logprob is None and plain.logprobs is None and plain.token_ids == c.token_ids


def test_empty_prompt_fails_alone(default_llm):
    outs = default_llm.generate(["", "The sky is"], GREEDY)
    assert outs[0].error and "prompt=''" in outs[0].error and outs[0].finish_reason == "error"
    assert outs[1].error is None and outs[1].token_ids
    with pytest.raises(ValueError, match="prompt=''"):
        default_llm.generate("", GREEDY, raise_on_error=True)


def test_prompt_longer_than_context_window_names_lengths(default_llm):
    max_len = default_llm.engine.engine_cfg.max_model_len
    long_ids = [260] * (max_len + 5)
    outs = default_llm.generate([{"prompt_token_ids": long_ids}, "Hi"], GREEDY)
    assert f"prompt length {max_len + 5}" in outs[0].error and f"max_model_len={max_len}" in outs[0].error
    assert outs[1].error is None


def test_bad_sampling_params_name_the_value():
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplingParams(top_p=1.5)


def test_bad_sampling_param_type_fails_alone(default_llm):
    outs = default_llm.generate(["a", "b"], [GREEDY, {"temperature": 0}])
    assert outs[1].error and "SamplingParams" in outs[1].error and outs[0].error is None


def test_missing_model_file_is_named(tmp_path):
    from model.checkpoint import load_model

    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(str(missing))


def test_unknown_architecture_is_named(tmp_path):
    import gguf

    from model.checkpoint import load_model

    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), "gptneox")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture='gptneox'"):
        load_model(str(path))


def test_streaming_yields_the_same_tokens(default_llm):
    want = default_llm.generate("Once upon a time", GREEDY)[0]
    deltas = list(default_llm.generate_stream("Once upon a time", GREEDY))
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert "".join(d.text for d in deltas) == want.text
    assert deltas[-1].finished and len(deltas) > 1


def test_n_samples_seeded(default_llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    a = default_llm.generate("Tell me a story", sp)[0]
    b = default_llm.generate("Tell me a story", sp)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_stop_string_truncates_text(default_llm):
    base = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0]
    stop = base.text.strip().split()[0][:4]
    out = default_llm.generate("The capital of France is",
                               SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
    assert out.finish_reason == "stop" and stop not in out.text and out.outputs[0].stop_reason == stop


def test_score_equals_generation_logprobs(default_llm):
    out = default_llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=5, logprobs=1))[0]
    ids = out.prompt_token_ids + out.token_ids
    scored = default_llm.score([default_llm.tokenizer.decode(ids)])[0]
    assert scored.token_ids == ids
    got = scored.token_logprobs[len(out.prompt_token_ids):]
    want = [lp[t] for lp, t in zip(out.outputs[0].logprobs, out.token_ids)]
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_score_many_texts_together_equals_each_alone(default_llm):
    """8 texts in one packed batch, 5 of them sharing a long (several-page) prefix: the same numbers as
    scoring each text by itself."""
    prefix = ("Researchers often score many candidate continuations of one long shared document, so the "
              "prefix below is the same for several texts and is longer than a few KV pages of sixteen tokens. "
              "A second sentence makes it longer still, so that the shared part spans several whole pages.")
    texts = [prefix + end for end in (" The end.", " Then it rained all day long.", " Paris", " 42", " and so on,")]
    texts += ["A short unrelated sentence.", "Hello", "The quick brown fox jumps over the lazy dog."]
    assert len(default_llm.tokenizer.encode(prefix)) > 3 * 16
    together = default_llm.score(texts)
    for text, got in zip(texts, together):
        alone = default_llm.score(text)[0]
        assert got.error is None and got.token_ids == alone.token_ids
        assert got.token_logprobs[0] is None and len(got.token_logprobs) == len(got.token_ids)
        # float32 rounding of differently shaped steps: ~1e-5 on logprobs of magnitude ~10
        np.testing.assert_allclose(got.token_logprobs[1:], alone.token_logprobs[1:], rtol=1e-5, atol=1e-5)


def test_prompt_logprobs(default_llm):
    out = default_llm.generate("Paris is the capital of",
                               SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, len(out.prompt_token_ids)))


def test_chat_applies_template(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=12))[0]
    assert "Paris" in out.text


def test_close_releases_and_blocks_further_use(default_model):
    from inference.llm import LLM

    llm = LLM(_loaded=default_model, num_pages=8)
    with llm:
        pass
    assert llm.engine.runner.cache is None and llm.engine.runner.params is None
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("hi", GREEDY)


def test_orbax_convert_roundtrip(default_model, tmp_path):
    from model.checkpoint import load_checkpoint, save_checkpoint

    cfg, params, tok = default_model
    save_checkpoint(tmp_path / "ckpt", cfg, params, tok)
    cfg2, params2, tok2 = load_checkpoint(tmp_path / "ckpt")
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(params2["layers"]["wq"]), np.asarray(params["layers"]["wq"]))
    assert tok2.encode("The capital of France is") == tok.encode("The capital of France is")
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_safetensors_dir_roundtrip(tmp_path):
    """An HF-layout directory (config.json + sharded safetensors) loads to the same params."""
    import jax
    from safetensors.numpy import save_file

    from model.config import PRESETS
    from model.hf_loader import load_hf_dir
    from model.llama import init_params

    cfg = dataclasses.replace(PRESETS["tiny"], attention_bias=True, architecture="qwen2")
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    names = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
             "mlp_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight"}
    tensors = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"],
               "lm_head.weight": params["lm_head"].T.copy()}
    hf_names = {**names, "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
                "w_down": "mlp.down_proj.weight"}
    hf_names.pop("gate")
    for i in range(cfg.num_layers):
        for ours, hf in hf_names.items():
            w = params["layers"][ours][i]
            tensors[f"model.layers.{i}.{hf}"] = (w.T if w.ndim == 2 else w).copy()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False,
        "max_position_embeddings": cfg.max_position_embeddings}))
    cfg2, params2, tok = load_hf_dir(tmp_path)
    assert tok is None and cfg2.num_layers == cfg.num_layers and cfg2.attention_bias
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loop", [{}, {"async_scheduling": True}, {"num_decode_steps": 4}],
                         ids=["sync", "overlapped", "multi_step"])
def test_warmup_then_a_64_request_job_compiles_nothing(default_model, loop):
    """XLA's own compile events (not engine bookkeeping): after LLM.warmup, a job of 64 requests with
    mixed prompt and output lengths, greedy and seeded sampling, runs without a single compilation.
    A 1-layer, 64-wide random model with the default tokenizer keeps the compiles cheap."""
    import jax

    from inference.runner import count_xla_compiles
    from inference.llm import LLM
    from model.config import LlamaConfig
    from model.llama import init_params

    tok = default_model[2]
    cfg = LlamaConfig(vocab_size=default_model[0].vocab_size, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, name="probe")
    params = init_params(cfg, jax.random.key(0))
    jax.clear_caches()  # each parametrization starts cold (engines with one config share step programs)
    with LLM(_loaded=(cfg, params, tok), max_num_seqs=8, max_num_batched_tokens=32, num_pages=160,
             page_size=16, **loop) as llm:
        with count_xla_compiles() as warm:
            programs = llm.warmup(logprobs=False, penalties=False)
        # Token buckets 8/16/32 x block-table widths 1/4/16 pages; multi-step adds its program at the
        # one sequence bucket (8) x the 3 widths.
        assert programs == 3 * 3 + (3 if "num_decode_steps" in loop else 0)
        assert warm.count >= programs  # the counter sees real compiles
        rng = np.random.default_rng(0)
        prompts = [{"prompt_token_ids": rng.integers(0, cfg.vocab_size, int(rng.integers(1, 120))).tolist()}
                   for _ in range(64)]
        sps = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True,
                              max_tokens=int(rng.integers(1, 60)), stop=["the"] if i % 3 else None)
               for i in range(64)]
        with count_xla_compiles() as job:
            outs = llm.generate(prompts, sps)
        assert all(o.error is None and o.finish_reason in ("stop", "length") for o in outs)
        assert max(len(p["prompt_token_ids"]) + len(o.token_ids) for p, o in zip(prompts, outs)) > 64
        assert job.count == 0
