"""The text sweep: sparse settings against full attention on teacher-forced real text."""

from __future__ import annotations

import sys
import time

import torch

from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.metrics import compare_logits
from kvdrive.progress import progress


def text_sweep(
    runner: Runner, rows: list[list[int]], context: int, settings: list[Setting], recall: bool = False
) -> dict:
    """rows: B token lists of context + steps + 1 tokens. Prefill ``context`` tokens, then
    teacher-force the next ``steps``; compare each setting's next-token distributions with
    full attention's (the first setting), and each compressed storage format's with the same
    setting over bf16 KV (``vs_bf16``, when that setting ran before it). ``recall``: also
    measure next-layer prediction on every sparse setting (``kvdrive.eval.recall``)."""
    steps = len(rows[0]) - context - 1
    runner.prefill([r[:context] for r in rows])
    cont = torch.tensor([r[context : context + steps] for r in rows])  # (B, M) inputs
    target = torch.tensor([r[context + 1 : context + steps + 1] for r in rows])  # (B, M) next tokens
    results, ref, plain = {}, None, {}
    for setting in progress(settings, desc=f"text {context}", unit="setting"):
        t0 = time.perf_counter()
        runner.use(setting, [context] * len(rows))
        probe = runner.recall_probe() if recall and setting.summary is not None else None
        if probe is None:
            logits = runner.decode(cont).cpu()  # (B, M, V)
        else:
            with probe:
                logits = runner.decode(cont, probe).cpu()
        ref = logits if ref is None else ref
        row = compare_logits(ref, logits, target).to_dict()
        if setting.kv_dtype == "bf16":
            plain[setting] = logits
        elif setting.in_bf16 in plain:
            row["vs_bf16"] = compare_logits(plain[setting.in_bf16], logits, target).to_dict()
        row["attended_fraction"] = runner.selected_fraction()
        if probe is not None:
            row["recall"] = probe.result()
        row["seconds"] = time.perf_counter() - t0
        print(f"text {context} {setting.label}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)
        results[setting.label] = row
    return results
