#!/usr/bin/env python
"""Generate Hugging Face transformers reference fixtures for SmolLM2-135M-Instruct (GGUF).

Run with the reference virtualenv (torch CPU + transformers + gguf):

    /work/refenv/bin/python scripts/make_hf_fixtures.py \
        [--gguf /root/.cache/ridgeline/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out-dir tests/fixtures]

transformers loads the GGUF *dequantized* to float32 (Q4_1 / Q8_0 blocks expanded
exactly, attn_q / attn_k rows un-permuted from llama.cpp's interleaved RoPE layout
back to HF's half-split layout) and runs it in float32 on CPU.

Outputs (in --out-dir):
  smollm2_hf_reference.npz   arrays (np.savez_compressed)
  smollm2_hf_reference.json  prompts, decoded texts, chat texts/messages, nll/ppl, metadata
  perplexity_text.txt        the fixed paragraph used for the perplexity reference

npz keys (i = prompt index, c = chat index):
  prompt{i}_ids               int32 [T]        tokenizer(prompt)["input_ids"] (no BOS is added)
  prompt{i}_last_logits       float32 [49152]  logits at the last prompt position
  prompt{i}_greedy_ids        int32 [32]       greedy continuation (EOS suppressed -> always 32)
  prompt{i}_greedy_margins    float32 [32]     top1 - top2 raw logit at each greedy step
  allpos_ids                  int32 [T]        ids of the all-positions prompt
  allpos_logits               float32 [T, 49152] logits at every prefill position
  chat{c}_ids                 int32 [T]        apply_chat_template(..., add_generation_prompt=True) ids
  chat{c}_last_logits         float32 [49152]  logits at the last chat-prompt position
  chat{c}_greedy_ids          int32 [32]       greedy continuation of the chat prompt (EOS suppressed)
  chat{c}_greedy_margins      float32 [32]
  ppl_ids                     int32 [N]        tokenizer(perplexity_text)["input_ids"]
  ppl_token_nll               float32 [N-1]    per-token NLL of ppl_ids[1:] (teacher forcing)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import sys

import numpy as np

DEFAULT_GGUF = "/root/.cache/ridgeline/models/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures")

NEW_TOKENS = 32
SEED = 0

PROMPTS = [
    # 0: required exact prompt
    "The capital of France is",
    # 1: short
    "Hello",
    # 2: longer (~60 tokens)
    (
        "In the small mountain village, the old clockmaker spent every morning repairing "
        "watches for the farmers who came down from the hills. He worked slowly and carefully, "
        "humming songs that his grandmother had taught him, while the children gathered at the "
        "window to watch the tiny gears turn. One winter day, a stranger arrived with"
    ),
    # 3: unicode / emoji / digits / code
    (
        "Café ☕ costs €3.50 in 2024 🎉 — naïve façade, 東京, Ωμέγα!\n"
        "def add(a, b):\n    return a + b  # 12345 + 67890 = 80235\n"
        "print(add(3, 4))"
    ),
    # 4: leading/trailing whitespace and newlines
    "  \n\tOnce upon a time,  \n\n   there was a little robot who loved to paint.\n\n  ",
]

# ~12 tokens: logits at every position are stored.
ALLPOS_PROMPT = "The quick brown fox jumps over the lazy dog because it"

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "Hi! Can you help me with math?"},
        {"role": "assistant", "content": "Of course! What would you like to know?"},
        {"role": "user", "content": "What is 12 times 7?"},
    ],
]

# Written for this project (original prose, free to use). ~350 tokens.
PERPLEXITY_TEXT = (
    "The lighthouse stood at the end of a narrow spit of rock, where the sea met the land in a "
    "constant argument of foam and stone. For more than a hundred years, keepers had climbed its "
    "spiral stairs each evening to light the lamp, and each morning they had climbed them again to "
    "put it out. The work was simple, but it was never easy. In winter the wind pushed against the "
    "windows until the glass hummed, and the salt crept into every hinge and lock.\n\n"
    "The last keeper was a quiet woman named Margaret, who kept a journal of the weather, the "
    "ships, and the birds. She wrote down the direction of the wind at dawn, the height of the "
    "waves at noon, and the color of the sky at dusk. Over the years her journal grew into a long "
    "record of small changes: the spring storms arriving a little earlier, the fishing boats "
    "growing fewer, the gulls nesting farther up the cliff.\n\n"
    "When the lamp was finally replaced by an automatic light, Margaret packed her books and "
    "moved to a cottage in the village below. People expected her to miss the tower, but she said "
    "that she had simply traded one window for another. Every evening she still watched the beam "
    "sweep across the water, counting the seconds between each flash, and every morning she still "
    "wrote a few lines about the weather. Her neighbors began to ask her whether it would rain, "
    "and she was almost always right.\n\n"
    "Years later, a student from the university came to read the old journals. She discovered "
    "that the careful notes formed one of the longest continuous records of coastal weather in "
    "the region. The numbers showed slow patterns that no single season could reveal, and the "
    "student wrote that the most valuable instrument in the lighthouse had not been the lamp, but "
    "the patient attention of the people who lived there."
)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def as_list(x):
    """apply_chat_template(tokenize=True) may return a list, a tensor or a BatchEncoding."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(t) for t in x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to the GGUF model file")
    ap.add_argument("--out-dir", default=DEFAULT_OUT, help="output directory for the fixtures")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()

    import torch
    import transformers
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    gguf_path = os.path.abspath(args.gguf)
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    os.makedirs(args.out_dir, exist_ok=True)

    print(f"loading {gguf_path} ...", flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    cfg = model.config
    vocab = int(cfg.vocab_size)
    eos_id = model.generation_config.eos_token_id
    pad_id = model.generation_config.pad_token_id
    eos_ids = eos_id if isinstance(eos_id, list) else [eos_id]

    arrays: dict[str, np.ndarray] = {}
    meta: dict = {}

    def forward_logits(ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids], dtype=torch.long)
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
        return out.logits[0].to(torch.float32).numpy()  # [T, vocab]

    def greedy(ids: list[int]):
        """Greedy decode NEW_TOKENS tokens; EOS suppressed (min_new_tokens) so exactly 32 come out."""
        x = torch.tensor([ids], dtype=torch.long)
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=pad_id,
            return_dict_in_generate=True,
            output_logits=True,
            num_beams=1,
        )
        gen = out.sequences[0, len(ids):].tolist()
        assert len(gen) == NEW_TOKENS, len(gen)
        raw = torch.stack(out.logits, 0)[:, 0].to(torch.float32)  # [32, vocab] unprocessed
        top2 = torch.topk(raw, 2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).numpy().astype(np.float32)
        raw_argmax = raw.argmax(-1).tolist()
        eos_would_win = [k for k, t in enumerate(raw_argmax) if t in eos_ids]
        # With EOS never the raw argmax, generated ids must equal the raw argmax at each step.
        for k, (g, a) in enumerate(zip(gen, raw_argmax)):
            if k not in eos_would_win:
                assert g == a, (k, g, a)
        return gen, margins, eos_would_win, raw[0].numpy()

    # ---------------- prompts ----------------
    meta_prompts = []
    for i, prompt in enumerate(PROMPTS):
        ids = [int(t) for t in tok(prompt)["input_ids"]]
        logits = forward_logits(ids)
        last = logits[-1].astype(np.float32)
        assert last.shape == (vocab,)
        gen, margins, eos_steps, first_step_logits = greedy(ids)
        diff_first = float(np.max(np.abs(first_step_logits - last)))
        text = tok.decode(gen)
        arrays[f"prompt{i}_ids"] = np.asarray(ids, np.int32)
        arrays[f"prompt{i}_last_logits"] = last
        arrays[f"prompt{i}_greedy_ids"] = np.asarray(gen, np.int32)
        arrays[f"prompt{i}_greedy_margins"] = margins
        meta_prompts.append(
            {
                "index": i,
                "prompt": prompt,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "num_tokens": len(ids),
                "last_argmax": int(last.argmax()),
                "greedy_ids": gen,
                "greedy_text": text,
                "prompt_plus_greedy_text": tok.decode(ids + gen),
                "greedy_min_margin": float(margins.min()),
                "greedy_steps_where_eos_was_argmax_and_suppressed": eos_steps,
                "generate_step0_vs_forward_last_maxabs": diff_first,
            }
        )
        print(f"[prompt{i}] {len(ids)} tok -> {text!r}  (min margin {margins.min():.4f}, eos@{eos_steps})",
              flush=True)
    meta["prompts"] = meta_prompts

    # ---------------- all positions ----------------
    ap_ids = [int(t) for t in tok(ALLPOS_PROMPT)["input_ids"]]
    ap_logits = forward_logits(ap_ids).astype(np.float32)
    arrays["allpos_ids"] = np.asarray(ap_ids, np.int32)
    arrays["allpos_logits"] = ap_logits
    meta["allpos"] = {
        "prompt": ALLPOS_PROMPT,
        "ids": ap_ids,
        "tokens": tok.convert_ids_to_tokens(ap_ids),
        "shape": list(ap_logits.shape),
        "argmax_per_position": [int(a) for a in ap_logits.argmax(-1)],
    }
    print(f"[allpos] logits {ap_logits.shape}", flush=True)

    # ---------------- chat template ----------------
    meta_chats = []
    for c, messages in enumerate(CHATS):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = as_list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        ids_from_text = [int(t) for t in tok(text)["input_ids"]]
        last = forward_logits(ids)[-1].astype(np.float32)
        gen, margins, eos_steps, _ = greedy(ids)
        arrays[f"chat{c}_ids"] = np.asarray(ids, np.int32)
        arrays[f"chat{c}_last_logits"] = last
        arrays[f"chat{c}_greedy_ids"] = np.asarray(gen, np.int32)
        arrays[f"chat{c}_greedy_margins"] = margins
        meta_chats.append(
            {
                "index": c,
                "messages": messages,
                "text": text,
                "ids": ids,
                "ids_equal_tokenizer_of_text": ids == ids_from_text,
                "greedy_ids": gen,
                "greedy_text": tok.decode(gen),
                "greedy_min_margin": float(margins.min()),
                "greedy_steps_where_eos_was_argmax_and_suppressed": eos_steps,
            }
        )
        print(f"[chat{c}] {len(ids)} tok -> {tok.decode(gen)!r} (eos@{eos_steps})", flush=True)
    meta["chats"] = meta_chats
    meta["chat_template"] = tok.chat_template

    # ---------------- perplexity ----------------
    ppl_path = os.path.join(args.out_dir, "perplexity_text.txt")
    with open(ppl_path, "w", encoding="utf-8") as f:
        f.write(PERPLEXITY_TEXT)
    with open(ppl_path, "r", encoding="utf-8") as f:
        ppl_text = f.read()
    assert ppl_text == PERPLEXITY_TEXT
    ppl_ids = [int(t) for t in tok(ppl_text)["input_ids"]]
    logits = torch.from_numpy(forward_logits(ppl_ids)).to(torch.float32)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ppl_ids[1:], dtype=torch.long)
    tok_nll = -logp.gather(1, targets[:, None])[:, 0]
    nll = float(tok_nll.mean())
    ppl = float(np.exp(nll))
    arrays["ppl_ids"] = np.asarray(ppl_ids, np.int32)
    arrays["ppl_token_nll"] = tok_nll.numpy().astype(np.float32)
    meta["perplexity"] = {
        "file": "perplexity_text.txt",
        "num_tokens": len(ppl_ids),
        "num_scored_tokens": len(ppl_ids) - 1,
        "method": "single float32 forward over all tokens (no BOS prepended); mean NLL of "
        "ids[1:] given prefixes (teacher forcing), natural log; ppl = exp(mean_nll)",
        "mean_nll": nll,
        "ppl": ppl,
    }
    print(f"[ppl] {len(ppl_ids)} tokens  nll={nll:.6f}  ppl={ppl:.4f}", flush=True)

    # ---------------- un-permutation check (gguf dequantize vs HF weights) ----------------
    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)

    def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
        # inverse of llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    layer0 = model.model.layers[0].self_attn
    checks = {}
    for gname, hf_w, heads in (
        ("blk.0.attn_q.weight", layer0.q_proj.weight, n_head),
        ("blk.0.attn_k.weight", layer0.k_proj.weight, n_kv),
        ("blk.0.attn_v.weight", layer0.v_proj.weight, None),
        ("token_embd.weight", model.model.embed_tokens.weight, None),
    ):
        t = tensors[gname]
        deq = gguf.quants.dequantize(t.data, t.tensor_type)
        w = unpermute(deq, heads) if heads else deq
        hf = hf_w.detach().numpy()
        checks[gname] = {
            "gguf_type": t.tensor_type.name,
            "gguf_shape_ne": [int(s) for s in t.shape],
            "dequantized_shape": list(deq.shape),
            "dequantized_dtype": str(deq.dtype),
            "hf_shape": list(hf.shape),
            "unpermuted": bool(heads),
            "max_abs_diff_vs_hf": float(np.max(np.abs(w - hf))),
            "max_abs_diff_vs_hf_without_unpermute": float(np.max(np.abs(deq - hf))),
        }
    checks["lm_head_tied_to_embed_tokens"] = bool(
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )
    checks["gguf_has_output_weight"] = "output.weight" in tensors
    meta["gguf_weight_checks"] = checks

    # ---------------- metadata ----------------
    meta["metadata"] = {
        "model_file": name,
        "model_sha256": sha256_file(gguf_path),
        "model_size_bytes": os.path.getsize(gguf_path),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": getattr(gguf, "__version__", None) or _pkg_version("gguf"),
        "numpy_version": np.__version__,
        "tokenizers_version": _pkg_version("tokenizers"),
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": args.threads,
        "seed": SEED,
        "deterministic_algorithms": True,
        "new_tokens": NEW_TOKENS,
        "greedy_method": "model.generate(do_sample=False, num_beams=1, max_new_tokens=32, "
        "min_new_tokens=32) -> EOS logits masked to -inf until 32 tokens, i.e. ignore-eos greedy",
        "tokenizer": {
            "class": type(tok).__name__,
            "add_bos_token_gguf": False,
            "adds_bos": bool(
                tok("x")["input_ids"][0] == tok.bos_token_id if tok.bos_token_id is not None else False
            ),
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "len": len(tok),
            "pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer),
        },
        "generation_config_eos_token_id": eos_id,
        "generation_config_pad_token_id": pad_id,
        "config": {
            k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v))
            for k, v in cfg.to_dict().items()
        },
    }

    npz_path = os.path.join(args.out_dir, "smollm2_hf_reference.npz")
    json_path = os.path.join(args.out_dir, "smollm2_hf_reference.json")
    np.savez_compressed(npz_path, **arrays)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {npz_path} ({os.path.getsize(npz_path) / 1e6:.2f} MB), {json_path}, {ppl_path}")

    p0 = meta_prompts[0]["prompt_plus_greedy_text"]
    if "paris" not in p0.lower():
        print(f"WARNING: greedy continuation of prompt0 does not mention Paris: {p0!r}")
    return 0


def _pkg_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
