"""Make the tiny bundled models: models/tiny-target and models/tiny-draft (HF Llama directories).

What it does, all offline, with fixed seeds:
  1. Corpus: the Python standard library's own *.py files (this interpreter's `sysconfig` stdlib dir,
     packages included; tests, codec tables and site-packages left out). Files are shuffled with a fixed seed; 10% are held out for evaluation. Each file is cut into
     documents at top-level `def`/`class` (decorators kept with them); some documented functions are
     rendered as ChatML chats ("Write a Python function ...") so the chat template has meaning.
     Documents are joined with <|endoftext|>, so the models learn to stop.
  2. Tokenizer: byte-level BPE (vocab 2048; any UTF-8 text round-trips) with <|endoftext|> (EOS, also
     pad), <|im_start|>, <|im_end|>, and a ChatML chat template. One tokenizer for both models.
  3. tiny-target: Llama (GQA 4 q / 2 kv heads, RMSNorm, SwiGLU, tied embeddings, 1024 positions),
     trained with AdamW on 512-token windows of the training stream.
  4. tiny-draft: the target's embeddings, final norm and layers 0 and 3 (a 2-layer Llama), then
     distilled from the target (KL to its distribution + a little data CE) on the training stream and
     on the target's own greedy continuations, which is what speculative decoding asks it to predict.
  5. Saves both as bfloat16 safetensors, reloads them from disk in float32 and measures: held-out
     loss, greedy speculative-decoding acceptance (k=4) and a text sample. Figures go to stdout and
     to OUT/training_report.json and OUT/README.md.

Run:  .venv/bin/python scripts/make_tiny_models.py --out models [--device cuda]
The committed models were made with `--device cuda` on one H100 (about 5 minutes; the corpus was the
stdlib of Python 3.11.7, copied and passed with --corpus-dir; its sha256 is in the report). The same
recipe on 2 idle CPU cores takes about 1.5 hours (a target step is about 0.8 s there): on a CPU, pass
fewer --target-steps / --draft-steps, or `--quick` for a smoke run of about 2 minutes.
Seeds are fixed; a rerun matches for the same corpus, device, torch version and thread count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# A top-level def/class with the decorators above it starts a document.
TOP_LEVEL = re.compile(r"^(?:@[^\n]*\n)*(?:async def |def |class )", re.M)
DEF_DOC = re.compile(r"(?:@[^\n]*\n)*(?:async )?def (\w+)\([^)]*(?:\([^)]*\)[^)]*)*\)[^\n]*:\n"
                     r"[ \t]+[rRuU]?(?:\"\"\"|\'\'\')[ \t]*([^\n]{8,})")


def documents(source: str, rng: random.Random, chat_fraction: float) -> list[str]:
    """Cut one module into top-level chunks (the module header is the first)."""
    bounds = [0, *[m.start() for m in TOP_LEVEL.finditer(source) if m.start() > 0], len(source)]
    docs = []
    for a, b in zip(bounds, bounds[1:]):
        chunk = source[a:b].strip("\n")
        if len(chunk) < 40:
            continue
        m = DEF_DOC.match(chunk)
        if m and rng.random() < chat_fraction:
            summary = m.group(2).strip().removesuffix('"""').removesuffix("'''").strip()
            ask = f"Write a Python function `{m.group(1)}`: {summary}"
            # The final assistant turn ends with <|im_end|> then EOS: generation stops right after it.
            chunk = (f"{IM_START}user\n{ask}{IM_END}\n{IM_START}assistant\n{chunk}\n{IM_END}")
        docs.append(chunk)
    return docs


# Tests, generated codec tables and pydoc's topic dump are not the Python we want the models to write.
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "lib-dynload", "__pycache__"}


def corpus_files(corpus_dir: Path) -> list[Path]:
    return sorted(p for p in corpus_dir.rglob("*.py") if p.is_file()
                  and not any(part in SKIP_DIRS or part.startswith("config-")
                              for part in p.relative_to(corpus_dir).parts[:-1]))


def build_corpus(corpus_dir: Path, seed: int, held_out: float, chat_fraction: float):
    files = corpus_files(corpus_dir)
    if len(files) < 20:
        raise SystemExit(f"--corpus-dir {corpus_dir} has {len(files)} *.py files; point it at a stdlib dir")
    rng = random.Random(seed)
    rng.shuffle(files)
    num_eval = max(2, int(len(files) * held_out))
    eval_files, train_files = files[:num_eval], files[num_eval:]
    read = lambda p: p.read_text(encoding="utf-8", errors="replace")  # noqa: E731
    train_docs = [d for p in train_files for d in documents(read(p), rng, chat_fraction)]
    eval_docs = [d for p in eval_files for d in documents(read(p), rng, chat_fraction)]
    rng.shuffle(train_docs)
    names = lambda ps: [str(p.relative_to(corpus_dir)) for p in ps]  # noqa: E731
    return train_docs, eval_docs, names(train_files), names(eval_files)


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=[IM_START, IM_END],
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024,
                                   clean_up_tokenization_spaces=False)


def encode_stream(tok, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(tok, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool):
    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=tied, hidden_act="silu", attention_bias=False,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.eos_token_id, initializer_range=0.02)


def windows(stream: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])  # [batch, seq_len]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def optimise(model, steps: int, peak_lr: float, batch_fn, loss_fn, name: str) -> float:
    """AdamW with warmup + cosine decay to 10%; returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    tail, t0 = [], time.monotonic()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr, warmup=max(1, steps // 20))
        loss = loss_fn(model, batch_fn(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= steps * 0.9:
            tail.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  {name} step {step:4d}/{steps} loss {loss.item():.3f} ({time.monotonic() - t0:.0f}s)",
                  flush=True)
    model.eval()
    return sum(tail) / len(tail)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int = 512, max_windows: int = 64) -> float:
    n = min(max_windows, (len(stream) - 1) // seq_len)
    ids = stream[:n * seq_len].view(n, seq_len).to(model.device)
    return sum(model(input_ids=ids[i:i + 8], labels=ids[i:i + 8]).loss.item() * len(ids[i:i + 8])
               for i in range(0, n, 8)) / n


@torch.no_grad()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[n, p] prompts -> [n, p + new_tokens] greedy sequences (EOS ignored: the stream goes on)."""
    out = []
    for chunk in prompts.split(64):
        cache = DynamicCache(config=model.config)
        seq = [chunk]
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
        for _ in range(new_tokens):
            seq.append(logits[:, -1].argmax(-1, keepdim=True))                    # [b, 1]
            if len(seq) <= new_tokens:
                logits = model(input_ids=seq[-1], past_key_values=cache, use_cache=True).logits
        out.append(torch.cat(seq, 1))
    return torch.cat(out)


def draft_from_target(target, layer_ids: list[int]):
    """A shallower copy of the target: its embeddings, final norm and the chosen decoder layers."""
    cfg = target.config.to_dict()
    cfg.update(num_hidden_layers=len(layer_ids))
    draft = LlamaForCausalLM(LlamaConfig(**cfg))
    src = target.state_dict()
    rename = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(layer_ids)}
    state = {}
    for key, value in src.items():
        if not key.startswith("model.layers."):
            state[key] = value.clone()
        for old, new in rename.items():
            if key.startswith(old):
                state[new + key[len(old):]] = value.clone()
    draft.load_state_dict(state)
    return draft


def distil_loss(target):
    def loss_fn(draft, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logp = F.log_softmax(target(input_ids=ids).logits.float(), -1)
        d_logp = F.log_softmax(draft(input_ids=ids).logits.float(), -1)
        kl = F.kl_div(d_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
        ce = F.nll_loss(d_logp[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return kl + 0.2 * ce
    return loss_fn


@torch.no_grad()
def speculative_acceptance(target, draft, prompts: list[torch.Tensor], new_tokens: int, k: int) -> dict:
    """Greedy speculative decoding: the draft proposes k tokens, the target keeps the longest prefix
    equal to its own greedy tokens plus one token of its own. Output equals plain target greedy."""
    proposed = accepted = rounds = 0
    for prompt in prompts:
        seq = prompt.tolist()
        goal = len(seq) + new_tokens
        while len(seq) < goal:
            guess = list(seq)
            for _ in range(k):
                ids = torch.tensor([guess], device=prompt.device)
                guess.append(int(draft(input_ids=ids).logits[0, -1].argmax()))
            logits = target(input_ids=torch.tensor([guess], device=prompt.device)).logits[0, len(seq) - 1:]
            want = logits.argmax(-1).tolist()             # k + 1 target greedy tokens
            n = 0
            while n < k and guess[len(seq) + n] == want[n]:
                n += 1
            proposed, accepted, rounds = proposed + k, accepted + n, rounds + 1
            seq = seq + guess[len(seq):len(seq) + n] + [want[n]]
    return {"k": k, "num_prompts": len(prompts), "new_tokens_per_prompt": new_tokens,
            "acceptance_rate": accepted / proposed, "mean_accepted_per_round": accepted / rounds,
            "tokens_per_target_forward": (accepted + rounds) / rounds}


def save(model, tok, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    model.generation_config = GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.eos_token_id, do_sample=False)
    model.to(torch.bfloat16).save_pretrained(out)
    model.float()
    tok.save_pretrained(out)
    add_legacy_keys(out, tok)
    return sum(f.stat().st_size for f in out.iterdir())


def add_legacy_keys(out: Path, tok) -> None:
    """transformers 5 writes rope_parameters / dtype / chat_template.jinja; loaders written for the 4.x
    layout (and other engines) read rope_theta / torch_dtype / tokenizer_config's chat_template."""
    def update(name: str, extra: dict) -> None:
        path = out / name
        data = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**data, **extra}, indent=2, sort_keys=True) + "\n")
    cfg = json.loads((out / "config.json").read_text())
    update("config.json", {"rope_theta": cfg["rope_parameters"]["rope_theta"], "torch_dtype": cfg["dtype"]})
    update("tokenizer_config.json", {"chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
                                     "additional_special_tokens": [IM_START, IM_END]})
    update("special_tokens_map.json", {"eos_token": EOS, "pad_token": EOS,
                                       "additional_special_tokens": [IM_START, IM_END]})


def write_readme(out: Path, report: dict) -> None:
    t, d, acc = report["target"], report["draft"], report["acceptance"]
    text = f"""# Tiny bundled models

Made by `scripts/make_tiny_models.py` (see its docstring); do not edit by hand.

| | tiny-target | tiny-draft |
| --- | --- | --- |
| layers / hidden / ffn | {t['layers']} / {t['hidden']} / {t['ffn']} | {d['layers']} / {d['hidden']} / {d['ffn']} |
| heads / kv heads | {t['heads']} / {t['kv_heads']} | {d['heads']} / {d['kv_heads']} |
| parameters | {t['params']:,} | {d['params']:,} |
| embeddings | {'tied' if t['tied'] else 'untied'} | {'tied' if d['tied'] else 'untied'} |
| size on disk | {t['bytes'] / 1e6:.1f} MB | {d['bytes'] / 1e6:.1f} MB |
| held-out loss (nats/token) | {t['eval_loss']:.3f} | {d['eval_loss']:.3f} |

Tokenizer (shared): byte-level BPE, {report['tokenizer']['vocab_size']} tokens, trained on the Python
standard library's *.py files (corpus sha256 {report['corpus']['sha256'][:12]}…) ({report['corpus']['train_files']} files; {report['corpus']['eval_files']} held out).
EOS/pad `<|endoftext|>`; chat template ChatML (`<|im_start|>` / `<|im_end|>`). Weights are bfloat16.

Greedy speculative decoding, draft k={acc['k']}, {acc['num_prompts']} held-out prompts x {acc['new_tokens_per_prompt']} tokens:
acceptance rate **{acc['acceptance_rate']:.1%}** of proposed draft tokens, {acc['mean_accepted_per_round']:.2f} accepted
per round, {acc['tokens_per_target_forward']:.2f} tokens per target forward.

Sample (tiny-target, greedy, held-out prompt):

```
{report['sample']}
```

All figures: `training_report.json`.
"""
    (out / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--corpus-dir", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to train on a GPU (same recipe, seconds)")
    ap.add_argument("--target-steps", type=int, default=3000)
    ap.add_argument("--target-hidden", type=int, default=192)
    ap.add_argument("--target-ffn", type=int, default=512)
    ap.add_argument("--draft-steps", type=int, default=6000)
    ap.add_argument("--draft-hidden", type=int, default=128)
    ap.add_argument("--draft-ffn", type=int, default=384)
    ap.add_argument("--draft-from-target", default="0,3", metavar="I,J",
                    help="start the draft from these target layers (plus its embeddings and norm)")
    ap.add_argument("--num-gen", type=int, default=1536, help="target greedy sequences the draft learns from")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, few eval prompts")
    args = ap.parse_args()
    if args.quick:
        args.target_steps, args.draft_steps = 20, 10
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    times, t0, dev = {}, time.monotonic(), torch.device(args.device)

    corpus_sha = hashlib.sha256(b"".join(p.read_bytes() for p in corpus_files(args.corpus_dir))).hexdigest()
    train_docs, eval_docs, train_files, eval_files = build_corpus(args.corpus_dir, args.seed, 0.1, chat_fraction=0.3)
    tok = train_tokenizer(train_docs, vocab_size=2048)
    train_ids, eval_ids = encode_stream(tok, train_docs), encode_stream(tok, eval_docs)
    print(f"corpus: {len(train_docs)} train docs ({len(train_ids):,} tokens), {len(eval_docs)} eval docs "
          f"({len(eval_ids):,} tokens); vocab {len(tok)}", flush=True)
    times["tokenizer_s"] = time.monotonic() - t0

    seq_len, batch = 512, 8
    gen = torch.Generator().manual_seed(args.seed)
    t = time.monotonic()
    torch.manual_seed(args.seed)
    target = LlamaForCausalLM(llama_config(tok, args.target_hidden, 4, 4, 2, args.target_ffn, tied=True)).to(dev)
    target_tail = optimise(target, args.target_steps, 3e-3,
                           lambda _: windows(train_ids, seq_len, batch, gen).to(dev), lm_loss, "target")
    times["target_train_s"] = time.monotonic() - t

    # The draft learns the target on data windows and on the target's own greedy text, half each.
    t = time.monotonic()
    num_gen = 64 if args.quick else args.num_gen
    gen_prompts = windows(train_ids, 64, num_gen, gen)
    target_text = greedy_continuations(target, gen_prompts.to(dev), 192).cpu()               # [num_gen, 256]
    times["target_generate_s"] = time.monotonic() - t
    torch.manual_seed(args.seed + 1)
    if args.draft_from_target is not None:
        draft = draft_from_target(target, [int(i) for i in args.draft_from_target.split(",")]).to(dev)
    else:
        draft = LlamaForCausalLM(llama_config(tok, args.draft_hidden, 2, 4, 2, args.draft_ffn, tied=False)).to(dev)

    def draft_batch(step: int) -> torch.Tensor:
        if step % 2:
            return target_text[torch.randint(0, len(target_text), (16,), generator=gen)].to(dev)
        return windows(train_ids, 256, 16, gen).to(dev)
    t = time.monotonic()
    draft_tail = optimise(draft, args.draft_steps, 3e-3, draft_batch, distil_loss(target), "draft")
    times["draft_train_s"] = time.monotonic() - t

    sizes = {name: save(m, tok, args.out / name) for name, m in (("tiny-target", target), ("tiny-draft", draft))}
    # Measure what ships: the bfloat16 files, loaded the way the engine and the tests load them.
    t = time.monotonic()
    target = AutoModelForCausalLM.from_pretrained(args.out / "tiny-target", dtype=torch.float32).to(dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.out / "tiny-draft", dtype=torch.float32).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(args.out / "tiny-target")
    erng = random.Random(args.seed + 2)
    starts = sorted(erng.sample(range(len(eval_ids) - 64), 10 if args.quick else 50))
    prompts = [eval_ids[s:s + 32].to(dev) for s in starts]
    acceptance = speculative_acceptance(target, draft, prompts, new_tokens=64, k=4)
    sample_ids = greedy_continuations(target, prompts[0][None], 96)[0]
    sample = tok.decode(sample_ids, skip_special_tokens=False)
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a Python function `is_even`: "
                                     "Return True if n is even."}], tokenize=False, add_generation_prompt=True)
    chat_ids = tok(chat, return_tensors="pt", add_special_tokens=False).input_ids.to(dev)
    chat_out = greedy_continuations(target, chat_ids, 96)[0, chat_ids.shape[1]:].tolist()
    if tok.eos_token_id in chat_out:
        chat_out = chat_out[:chat_out.index(tok.eos_token_id) + 1]
    chat_reply = tok.decode(chat_out, skip_special_tokens=False)
    times["eval_s"] = time.monotonic() - t
    times["total_s"] = time.monotonic() - t0

    def describe(m, name, tail):
        c = m.config
        return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "ffn": c.intermediate_size,
                "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "tied": c.tie_word_embeddings,
                "params": sum(p.numel() for p in m.parameters()), "bytes": sizes[name],
                "train_loss_tail": tail, "eval_loss": eval_loss(m, eval_ids)}
    report = {
        "corpus": {"dir": str(args.corpus_dir), "sha256": corpus_sha,
                   "train_files": len(train_files),
                   "eval_files": len(eval_files), "eval_file_names": eval_files,
                   "train_tokens": len(train_ids), "eval_tokens": len(eval_ids)},
        "tokenizer": {"vocab_size": len(tok), "eos": EOS, "eos_token_id": tok.eos_token_id},
        "target": describe(target, "tiny-target", target_tail),
        "draft": describe(draft, "tiny-draft", draft_tail),
        "acceptance": acceptance, "sample": sample, "chat_prompt": chat, "chat_reply": chat_reply,
        "seconds": {k: round(v, 1) for k, v in times.items()}, "torch": torch.__version__, "device": args.device,
        "python": sys.version.split()[0], "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "threads": args.threads, "seed": args.seed, "target_steps": args.target_steps,
        "draft_steps": args.draft_steps,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(args.out, report)
    print(json.dumps({k: report[k] for k in ("target", "draft", "acceptance", "seconds")}, indent=2))
    print("--- sample (target, greedy) ---\n" + sample + "\n--- chat reply ---\n" + chat_reply)


if __name__ == "__main__":
    main()
