"""Does a rotation of the head dimension make fp8 keys as good as int8's?

fp8 (e4m3) keeps 3 mantissa bits of each key entry, so a key channel that dominates q.k is
rounded by up to 1/16 of its value. QuaRot-style Hadamard rotations spread such channels
over all of D before quantizing, so their rounding errors average out in q.k. This measures
it on a real model's keys and queries: one prompt of real prose is prefilled with full
attention; every layer's post-RoPE keys go through a storage format's round trip
(``kvdrive.quant.formats``, 16-token groups), with or without a normalized Hadamard rotation
of D after centring each channel over its group (undone after the round trip); the last
``--queries`` queries of every head attend to the exact and the round-tripped keys, and the
KL between the two attention distributions is averaged over layers, heads and queries.

    python3 bench/scripts/fp8_key_rotation.py OUT.json [--model smollm2] [--length 2048]
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import kvdrive.cache.contiguous as contiguous
from kvdrive.eval import corpus
from kvdrive.models.loader import load_model
from kvdrive.quant.formats import dequantize, quantize
from kvdrive.results import write_result

GROUP = 16  # tokens a stored group (the tiered cache's default)


def hadamard(n: int) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order n (a power of two): orthogonal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def round_trip(k: torch.Tensor, fmt: str, rotate: bool) -> torch.Tensor:
    """Keys (H, T, D) through ``fmt`` in groups of GROUP tokens (a partial last group stays exact)."""
    h, t, d = k.shape
    whole = t // GROUP * GROUP
    kk = k[:, :whole].reshape(h, -1, GROUP, d)
    if rotate:
        centre = kk.mean(2, keepdim=True)
        kk = (kk - centre) @ hadamard(d)
    groups = torch.stack([kk, kk]).permute(2, 0, 1, 3, 4).contiguous()  # (N, 2, H, G, D): K (V unused)
    out = dequantize(quantize(groups, fmt), fmt, (h, GROUP, d), torch.float32)[:, 0].transpose(0, 1)  # (H, N, G, D)
    if rotate:
        out = out @ hadamard(d).T + centre
    return torch.cat([out.reshape(h, whole, d), k[:, whole:]], 1)


def attention_kl(q: torch.Tensor, k: torch.Tensor, k_test: torch.Tensor, scale: float, window: int | None) -> float:
    """Mean KL(exact || test) of causal attention (within ``window`` keys where the layer has one)
    of q (H_q, Q, D), the last Q positions, over keys (H_kv, T, D)."""
    rep = q.shape[0] // k.shape[0]
    t, n_q = k.shape[1], q.shape[1]
    key, pos = torch.arange(t)[None], torch.arange(t - n_q, t)[:, None]
    future = (key > pos) | ((key <= pos - window) if window is not None else False)

    def logp(keys):
        s = q @ keys.repeat_interleave(rep, 0).transpose(-1, -2) * scale
        return s.masked_fill(future, float("-inf")).log_softmax(-1)

    a, b = logp(k), logp(k_test)
    return float(torch.where(future, 0.0, a.exp() * (a - b)).sum(-1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--offset", type=int, default=5000, help="first token of the prose taken")
    p.add_argument("--text", default="kjv")
    args = p.parse_args()
    lm = load_model(args.model, device="cpu", dtype=torch.float32)
    text = corpus.load_text(args.text, fetch_missing=True)
    ids = lm.tokenizer(text.text, add_special_tokens=False)["input_ids"][args.offset : args.offset + args.length]
    layers = []
    exact = contiguous.chunk_attention

    def record(q, k, v, start, spec, k_start=0):  # the prompt is one chunk: every key, every query
        layers.append((q[0, :, -args.queries :].clone(), k[0, :, : start + q.shape[2]].clone(), spec))
        return exact(q, k, v, start, spec, k_start)

    contiguous.chunk_attention = record
    cache = contiguous.ContiguousKVCache(lm.model.config, 1, len(ids), torch.device("cpu"), torch.float32)
    cache.add(0, len(ids))
    with torch.no_grad():
        lm.model(torch.tensor([ids]), cache, cache.plan([0], len(ids)))
    contiguous.chunk_attention = exact
    results = {}
    for fmt in ("fp8", "int8", "int4"):
        for rotate in (False, True):
            kl = [attention_kl(q, k, round_trip(k, fmt, rotate), s.scale, s.window) for q, k, s in layers]
            results[fmt + ("+hadamard" if rotate else "")] = {"attention_kl": sum(kl) / len(kl), "by_layer": kl}
            print(
                fmt,
                "rotated" if rotate else "as stored",
                f"{results[fmt + ('+hadamard' if rotate else '')]['attention_kl']:.3e}",
            )
    config = {k: getattr(args, k) for k in ("model", "length", "queries", "offset", "text")}
    config.update(group_tokens=GROUP, device="cpu", dtype="float32")
    notes = [
        "attention_kl: KL(exact || round-tripped keys) of one head's causal attention, averaged over the last "
        "`queries` positions, heads and layers; values stay exact",
        "+hadamard: each key channel centred over its group, the head dim rotated by a normalized Hadamard "
        "matrix, stored, then rotated back and the centre added",
    ]
    write_result(args.out, "fp8_key_rotation", config, results, notes)


if __name__ == "__main__":
    main()
