"""Sweeps of sparse settings against full attention: teacher-forced text and tasks."""

from __future__ import annotations

import sys
import time

import torch

from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.metrics import accuracy, compare_logits
from kvdrive.eval.tasks import rank_score
from kvdrive.progress import progress


def text_sweep(runner: Runner, rows: list[list[int]], context: int, settings: list[Setting],
               recall: bool = False) -> dict:
    """rows: B token lists of context + steps + 1 tokens. Prefill ``context`` tokens, then
    teacher-force the next ``steps``; compare each setting's next-token distributions with
    full attention's (the first setting). ``recall``: also measure next-layer prediction
    on every sparse setting (``kvdrive.eval.recall``)."""
    steps = len(rows[0]) - context - 1
    runner.prefill([r[:context] for r in rows])
    cont = torch.tensor([r[context : context + steps] for r in rows])  # (B, M) inputs
    target = torch.tensor([r[context + 1 : context + steps + 1] for r in rows])  # (B, M) next tokens
    results, ref = {}, None
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
        row["attended_fraction"] = runner.selected_fraction()
        if probe is not None:
            row["recall"] = probe.result()
        row["seconds"] = time.perf_counter() - t0
        print(f"text {context} {setting.label}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)
        results[setting.label] = row
    return results


def answer_logprob(runner: Runner, first_logp: torch.Tensor, prefix_len: int, candidate: list[int]) -> float:
    """Sum of log p(candidate) after a prefix of ``prefix_len`` tokens whose last-step
    log-probs are ``first_logp`` (V,); the rest of the candidate is decoded with the
    current setting. Rewinds to the prefix afterwards."""
    total = float(first_logp[candidate[0]])
    if len(candidate) > 1:
        logp = runner.decode(torch.tensor([candidate[:-1]])).log_softmax(-1)[0]  # (n-1, V)
        total += float(logp.gather(-1, torch.tensor(candidate[1:], device=logp.device)[:, None]).sum())
    runner.cache.truncate(0, prefix_len)
    return total


def task_sweep(runner: Runner, items: list, settings: list[Setting]) -> dict:
    """items: ``kvdrive.eval.tasks.Item``. The context is prefilled exactly; the question and
    every candidate answer are decoded under each setting; the score is precision at k of
    the candidates ranked by log-probability (``tasks.rank_score``)."""
    scores = {s.label: [] for s in settings}
    for item in progress(items, desc="tasks", unit="item"):
        t0 = time.perf_counter()
        n_ctx = len(item.context_ids)
        runner.prefill([item.context_ids])
        q = torch.tensor([item.question_ids])
        for setting in settings:
            runner.use(setting, [n_ctx])
            first = runner.decode(q)[0, -1].log_softmax(-1)
            prefix = n_ctx + len(item.question_ids)
            lp = [answer_logprob(runner, first, prefix, c) for c in item.candidates]
            scores[setting.label].append(rank_score(item, lp))
        print(f"task {item.family} {len(item.prompt_ids)}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    out = {}
    for label, v in scores.items():
        acc = accuracy(v)
        out[label] = {"accuracy": acc.mean, "stderr": acc.stderr, "items": acc.items}
    return out
