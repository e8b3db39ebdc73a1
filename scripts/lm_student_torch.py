"""PyTorch reference of `distill bench --only lm-student`: the same llama student shape
(SmolLM2-135M's width with LAYERS decoder layers, transformers' LlamaForCausalLM), the same
update (forward, next-token cross-entropy, backward, AdamW) on the same batch shape of
synthetic tokens, on the CPU with THREADS threads. Prints `RESULT {json}` with the median
update's training tokens/s.

    python lm_student_torch.py --layers 4 --batch 8 --len 256 --threads 2 --secs 20
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--secs", type=float, default=20.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=a.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    params = sum(p.numel() for p in model.parameters())

    def windows(seed):
        n = a.batch * (a.len + 1)
        i = torch.arange(n, dtype=torch.int64)
        return ((i * 7919 + seed * 104729) % cfg.vocab_size).view(a.batch, a.len + 1)

    def step(seed):
        w = windows(seed)
        x, y = w[:, :-1], w[:, 1:]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, cfg.vocab_size), y.reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < a.secs or len(times) < 3:
        t = time.perf_counter()
        step(len(times) + 1)
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    rate = a.batch * a.len / median
    print(
        f"torch {torch.__version__}: llama {a.layers}x576 ({params / 1e6:.1f}M parameters), "
        f"{len(times)} updates, median {median:.3f} s: {rate:.0f} training tokens/s"
    )
    print("RESULT " + json.dumps({
        "section": "lm-student-torch",
        "layers": a.layers,
        "batch": a.batch,
        "len": a.len,
        "median_step_secs": median,
        "tokens_per_sec": rate,
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
