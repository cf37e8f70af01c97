"""Quantized models end to end: GGUF blocks kept as QuantizedWeights (no float round trip), LLM(quantization=...,
kv_cache_dtype="int8"), the int4 group size choice, and quality of the default model against float.

The synthetic GGUF tests are fast; the default-model ones load SmolLM2-135M (~5 s, shared fixture) and run a
few forwards (~30 s on CPU). Full numbers: scripts/bench_quantization.py.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference.llm import LLM
from inference.sampling_params import SamplingParams
from model.quantize import QuantizedWeight, dequantize, quantize_params
from scripts.bench_quantization import agreement, greedy_tokens, paged_nll, perplexity

FIXTURES = Path(__file__).parent / "fixtures"
HF_PPL = json.loads((FIXTURES / "smollm2_hf_reference.json").read_text())["perplexity"]


# ---------------------------------------------------------------------------------------------- synthetic GGUF

D, F, HEADS, KV_HEADS, LAYERS = 64, 96, 4, 2, 2
HEAD_DIM = D // HEADS
# Tensor type per layer: one key of each directly mapped type, a float one, and one whose layers disagree.
TYPES = {
    "attn_q": ["Q8_0", "Q8_0"],   # int8 (group 32), rows un-permuted
    "attn_k": ["Q4_0", "Q4_0"],   # int4, zeros = -8 d, rows un-permuted
    "attn_v": ["Q4_1", "Q4_1"],   # int4
    "attn_output": ["Q8_0", "F16"],  # mixed across layers: loads as float
    "ffn_gate": ["Q4_1", "Q4_1"],
    "ffn_up": ["F32", "F32"],
    "ffn_down": ["Q8_0", "Q8_0"],
}
OURS = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w_gate", "ffn_up": "w_up",
        "ffn_down": "w_down"}
SHAPES = {"attn_q": (D, D), "attn_k": (KV_HEADS * HEAD_DIM, D), "attn_v": (KV_HEADS * HEAD_DIM, D),
          "attn_output": (D, D), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}  # GGUF [out, in]


def byte_tokens() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2's bytes_to_unicode), so every byte is a token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_context_length(256)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    tokens = byte_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([])
    writer.add_eos_token_id(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), D)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(D, np.float32))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        for name, types in TYPES.items():
            w = (rng.standard_normal(SHAPES[name]) / np.sqrt(SHAPES[name][1])).astype(np.float32)
            qtype = gguf.GGMLQuantizationType[types[i]]
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=qtype if types[i].startswith("Q") else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_float(tiny_gguf):
    from model.gguf_loader import load_gguf

    return load_gguf(tiny_gguf)


@pytest.mark.parametrize("mode,kept", [
    ("gguf", {"wq": 8, "wk": 4, "wv": 4, "w_gate": 4, "w_down": 8}),
    ("int8", {"wq": 8, "w_down": 8}),
    ("int4", {"wk": 4, "wv": 4, "w_gate": 4}),
])
def test_gguf_blocks_kept_and_exact(tiny_gguf, tiny_float, mode, kept):
    from model.gguf_loader import load_gguf

    cfg, params, _ = load_gguf(tiny_gguf, quantization=mode)
    _, float_params, _ = tiny_float
    layers = params["layers"]
    assert {k: w.bits for k, w in layers.items() if isinstance(w, QuantizedWeight)} == kept
    for key, w in layers.items():
        expected = float_params["layers"][key]
        if isinstance(w, QuantizedWeight):
            assert w.group_size == 32 and w.shape == expected.shape and isinstance(w.values, np.ndarray)
            # Same numbers as the float loader (dequantize + un-permute): the Q/K row gather is exact.
            np.testing.assert_allclose(np.asarray(dequantize(w)), expected, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(w, expected)


def test_gguf_quantized_forward_matches_float(tiny_gguf, tiny_float):
    from model.gguf_loader import load_gguf

    cfg, qparams, _ = load_gguf(tiny_gguf, quantization="gguf")
    _, float_params, _ = tiny_float
    ids = [3, 7, 200, 41, 9, 65, 66, 67, 12]
    nll = {name: paged_nll(jax.device_put(p), cfg, ids) for name, p in (("q", qparams), ("f", float_params))}
    np.testing.assert_allclose(nll["q"], nll["f"], atol=1e-4)


def test_load_gguf_rejects_unknown_mode(tiny_gguf):
    from model.gguf_loader import load_gguf

    with pytest.raises(ValueError, match=r"quantization='q3' must be one of"):
        load_gguf(tiny_gguf, quantization="q3")


def first_layer(llm):
    """Layer 0's weights: on CPU the LLM unstacks layers into a list (see model.llama.unstack_layers)."""
    layers = llm.engine.runner.params["layers"]
    return layers[0] if isinstance(layers, list) else layers


def test_llm_int4_from_a_gguf_file_keeps_its_blocks_and_picks_group_32(tiny_gguf):
    # Q4_0 / Q4_1 projections are used as they are; the others (in dims 64 and 96) get int4 with group 32.
    with LLM(str(tiny_gguf), quantization="int4", kv_cache_dtype="int8", max_num_seqs=2,
             max_num_batched_tokens=32, num_pages=8) as llm:
        layers = first_layer(llm)
        assert all(isinstance(layers[k], QuantizedWeight) and layers[k].bits == 4 and layers[k].group_size == 32
                   for k in OURS.values())
        assert llm.engine.runner.cache["k"].dtype == jnp.int8
        out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=5,
                                                                              ignore_eos=True))[0]
        assert out.error is None and len(out.outputs[0].token_ids) == 5


def test_llm_explicit_group_size_and_gguf_mode(tiny_gguf, tiny_float):
    with LLM(str(tiny_gguf), quantization="gguf", num_pages=4, max_num_seqs=2, max_num_batched_tokens=32) as llm:
        layers = first_layer(llm)
        assert layers["wq"].bits == 8 and layers["wk"].bits == 4 and not isinstance(layers["wo"], QuantizedWeight)
    with LLM(_loaded=tiny_float, quantization="int4", quantization_group_size=32, num_pages=4, max_num_seqs=2,
             max_num_batched_tokens=32) as llm:
        assert first_layer(llm)["w_down"].group_size == 32
    with pytest.raises(ValueError, match=r"quantization='gguf' needs a GGUF model"):
        LLM(_loaded=tiny_float, quantization="gguf")  # float params: nothing to keep
    with pytest.raises(ValueError, match=r"quantization='fp8' must be 'auto', None, 'int8', 'int4', 'w8a8' or 'gguf'"):
        LLM(_loaded=tiny_float, quantization="fp8")


def test_llm_w8a8_from_a_gguf_keeps_its_q8_0_blocks_as_activation_blocks(tiny_gguf, tiny_float):
    """quantization="w8a8" from a GGUF: Q8_0 projections stay as they are (group 32) and quantize their activations
    per the same 32 inputs, the rest become per-channel int8 with 64-input (here: the largest multiple of 4
    dividing the input dim, at most 64) activation blocks, the head too; the model generates."""
    kw = dict(num_pages=8, max_num_seqs=2, max_num_batched_tokens=32)
    with LLM(str(tiny_gguf), quantization="w8a8", **kw) as llm:
        layers = first_layer(llm)
        assert (layers["wq"].group_size, layers["wq"].act_block) == (32, 32)  # Q8_0 kept
        assert layers["w_up"].group_size is None and layers["w_up"].act_block is not None
        assert all(layers[k].bits == 8 for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
        assert llm.engine.runner.params["lm_head"].act_block is not None
        out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=6,
                                                                              ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 6


def test_llm_quantized_on_cpu_gets_an_int8_lm_head_unless_told_not_to(tiny_float):
    """On CPU a quantized LLM also quantizes its LM head (the CPU kernel reads it faster than XLA's float head);
    quantize_lm_head=False keeps the float head, and both generate."""
    kw = dict(num_pages=4, max_num_seqs=2, max_num_batched_tokens=32)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    heads = {}
    for flag in (None, False):
        with LLM(_loaded=tiny_float, quantization="int8", quantize_lm_head=flag, **kw) as llm:
            heads[flag] = llm.engine.runner.params.get("lm_head")
            assert len(llm.generate({"prompt_token_ids": [5, 6, 7]}, sp)[0].outputs[0].token_ids) == 4
    assert isinstance(heads[None], QuantizedWeight) and heads[None].bits == 8
    assert not isinstance(heads[False], QuantizedWeight)
    with LLM(_loaded=tiny_float, **kw) as llm:  # float models keep a float head
        assert not isinstance(llm.engine.runner.params.get("lm_head"), QuantizedWeight)


def test_auto_quantization_is_w8a8_on_cpu_unless_a_dtype_is_asked_for(tiny_gguf, tiny_float):
    """quantization="auto" (the default) on CPU: int8 weights and an int8 LM head, with int8 activations (W8A8)
    where the int8-dot kernel runs, weight-only int8 elsewhere; dtype="float32" or weights passed in keep float
    weights."""
    from pallas_kernels.cpu_quantized_matmul import int8_dot_available

    kw = dict(num_pages=8, max_num_seqs=2, max_num_batched_tokens=32)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    want = "w8a8" if int8_dot_available() else "int8"
    with LLM(str(tiny_gguf), **kw) as llm:
        wq, head = first_layer(llm)["wq"], llm.engine.runner.params["lm_head"]
        assert llm.quantization == want and wq.bits == 8 and head.bits == 8
        assert (wq.act_block is not None) == (want == "w8a8") and (head.act_block is not None) == (want == "w8a8")
        assert len(llm.generate(prompt, sp)[0].outputs[0].token_ids) == 6
    with LLM(str(tiny_gguf), quantization="int8", **kw) as llm:
        assert first_layer(llm)["wq"].act_block is None
    with LLM(str(tiny_gguf), dtype="float32", **kw) as llm:
        assert llm.quantization is None and not isinstance(first_layer(llm)["wq"], QuantizedWeight)
    with LLM(_loaded=tiny_float, **kw) as llm:
        assert llm.quantization is None


# ---------------------------------------------------------------------------------------------- default model


@pytest.fixture(scope="module")
def ppl_ids(default_model):
    return default_model[2].encode((FIXTURES / HF_PPL["file"]).read_text())


def test_int4_group_size_for_the_default_model(default_model):
    # Input dims 576 and 1536: 128 does not divide 576, 64 divides both.
    with LLM(_loaded=default_model, quantization="int4", num_pages=4, max_num_seqs=2) as llm:
        layers = first_layer(llm)
        assert {layers[k].group_size for k in ("wq", "w_down")} == {64}


def test_int8_perplexity_within_2_percent_of_float(default_model, ppl_ids):
    """int8 weights: LLM.score's dense path and the paged path with an int8 KV cache both stay within 2% of the
    float perplexity (HF float32: 24.433; ridgeline float matches it within 1e-3). int4 is printed."""
    from inference.scoring import token_logprobs

    cfg, params, _ = default_model
    int8 = quantize_params(params, "int8")
    dense = perplexity(-token_logprobs(int8, cfg, ppl_ids))
    paged = perplexity(paged_nll(int8, cfg, ppl_ids, jnp.int8))
    int4 = perplexity(paged_nll(quantize_params(params, "int4", 64), cfg, ppl_ids, jnp.int8))
    print(f"\nperplexity: float (HF) {HF_PPL['ppl']:.3f}, int8 weights {dense:.3f}, int8 weights + int8 KV "
          f"{paged:.3f}, int4-g64 weights + int8 KV {int4:.3f} ({100 * (int4 / HF_PPL['ppl'] - 1):+.1f}%)")
    assert abs(dense / HF_PPL["ppl"] - 1) < 0.02
    assert abs(paged / HF_PPL["ppl"] - 1) < 0.02


def test_llm_int8_weights_and_int8_kv_end_to_end(default_model):
    """LLM(quantization="int8", kv_cache_dtype="int8"): the engine runs on an int8 pool (model.config's
    KV_CACHE_DTYPES maps "int8" to it), answers correctly, and LLM.score still works (a float scratch pool)."""
    with LLM(_loaded=default_model, quantization="int8", kv_cache_dtype="int8", max_num_seqs=4,
             max_num_batched_tokens=64) as llm:
        cache = llm.engine.runner.cache
        assert cache["k"].dtype == jnp.int8 and cache["k_scale"].dtype == jnp.float32
        out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6))[0]
        assert "Paris" in out.text
        score = llm.score("The capital of France is Paris.")[0]
        assert np.isfinite(score.perplexity) and 1 < score.perplexity < 1000


def _dense_hidden(params, cfg, ids):
    """Final-norm hidden states [len(ids), d] of a teacher-forced dense forward."""
    from model.llama import StepInputs, hidden_states, init_cache

    n = len(ids)
    inputs = StepInputs(tokens=jnp.asarray(ids, jnp.int32), positions=jnp.arange(n, dtype=jnp.int32),
                        slot_mapping=jnp.full((n,), -1, jnp.int32), cu_q_lens=jnp.asarray([0, n], jnp.int32),
                        kv_lens=jnp.asarray([n], jnp.int32), block_tables=jnp.zeros((1, 1), jnp.int32),
                        num_seqs=jnp.asarray([1], jnp.int32), logits_indices=jnp.arange(n, dtype=jnp.int32))
    return hidden_states(params, init_cache(cfg, 1, 1), inputs, cfg, attn_impl="xla", dense_prefill_len=n)[0]


def test_int8_lm_head_logits_close_to_the_float_head(default_model, ppl_ids):
    """The tied model's int8 head copy against the float embedding on the same hidden states. The default file
    stores token_embd as Q8_0, so quantize_params' 32-input groups re-grid it exactly: the logits match the
    float head's to float rounding. One scale per vocab row (group_size None) is lossy: within the rounding
    bound |dlogit[n, v]| <= sum_g scale[g, v] / 2 * sum_{d in g} |h[n, d]|, within 1.0 logit (logits reach
    ~37; measured 0.6) and the float top-1 token's log-prob moved by < 0.15 (measured max 0.10, mean 0.03)."""
    from model.llama import logits_from_hidden
    from model.quantize import quantize_int8

    cfg, params, _ = default_model
    q = quantize_params(params, "int8", quantize_lm_head=True)
    assert q["embed"] is params["embed"] and q["lm_head"].group_size == 32
    per_row = dict(q, lm_head=quantize_int8(params["embed"].T))
    h = _dense_hidden(params, cfg, ppl_ids[:48])                                   # [48, d]
    want = np.asarray(logits_from_hidden(params, h, cfg))                          # float head (embedding)
    for rows in (h, h[-1:]):  # the prefill shape (XLA path) and M = 1 (the CPU kernel)
        ref = want[-len(rows):]
        np.testing.assert_allclose(np.asarray(logits_from_hidden(q, rows, cfg)), ref, rtol=0, atol=1e-3)
        got = np.asarray(logits_from_hidden(per_row, rows, cfg))
        diff = np.abs(got - ref)
        bound = np.abs(np.asarray(rows)).sum(-1, keepdims=True) * np.asarray(per_row["lm_head"].scales) / 2
        assert (diff <= bound * (1 + 1e-3) + 1e-4).all()
        assert diff.max() < 1.0, diff.max()
        top = ref.argmax(-1)[:, None]
        dlogp = np.abs(np.take_along_axis(np.asarray(jax.nn.log_softmax(got) - jax.nn.log_softmax(ref)), top, 1))
        assert dlogp.max() < 0.15, dlogp.max()


def test_int8_lm_head_runs_on_the_cpu_kernel_at_batch_1(default_model):
    """At M = 1 on CPU the head's matmul lowers to the jax.ffi kernel's custom call (the float head does not)."""
    from model.llama import logits_from_hidden
    from pallas_kernels import cpu_quantized_matmul as cpu

    if jax.default_backend() != "cpu" or not cpu.available():
        pytest.skip("the CPU quantized-matmul kernel is not available here")
    cfg, params, _ = default_model
    h = jnp.zeros((1, cfg.hidden_size), jnp.float32)
    lowered = lambda p: jax.jit(lambda p, h: logits_from_hidden(p, h, cfg)).lower(p, h).as_text()  # noqa: E731
    assert "ridgeline_qmatmul_int8" in lowered(quantize_params(params, "int8", quantize_lm_head=True))
    assert "ridgeline_qmatmul" not in lowered(params)
    assert "ridgeline_qmatmul" not in lowered(quantize_params(params, "int8"))  # the default: the float head


@pytest.mark.slow
def test_greedy_agreement_with_float(default_model):
    """Reported, loosely bounded: a 135M model has near-ties that any perturbation can flip, so greedy
    continuations diverge at some point even when the perplexity moves by < 0.5%."""
    from scripts.bench_quantization import GREEDY_PROMPTS

    cfg, params, tok = default_model
    prompts = [tok.encode(p) for p in GREEDY_PROMPTS]
    base = greedy_tokens(params, cfg, prompts, 32)
    results = {}
    for name, p, kv in (("int8 + int8 KV", quantize_params(params, "int8"), jnp.int8),
                        ("w8a8", quantize_params(params, "w8a8", quantize_lm_head=True), jnp.float32),
                        ("float + int8 KV", params, jnp.int8),
                        ("int4-g64 + int8 KV", quantize_params(params, "int4", 64), jnp.int8)):
        results[name] = agreement(greedy_tokens(p, cfg, prompts, 32, kv), base)
    print("\ngreedy agreement (same tokens, common prefix):", results)
    assert results["float + int8 KV"][1] >= 0.5 and results["int8 + int8 KV"][1] >= 0.2
    assert results["w8a8"][1] >= 0.2
