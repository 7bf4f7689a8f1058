"""Sweeps of sparse settings against full attention: teacher-forced text and tasks."""

from __future__ import annotations

import math

import torch

from kvdrive.eval.harness import Runner, Setting
from kvdrive.progress import progress


def text_sweep(runner: Runner, rows: list[list[int]], context: int, settings: list[Setting]) -> dict:
    """rows: B token lists of at least context + steps + 1 tokens. Prefill ``context``
    tokens, then teacher-force the next ``steps``; compare each setting's next-token
    distributions with full attention's."""
    steps = len(rows[0]) - context - 1
    runner.prefill([r[:context] for r in rows])
    cont = torch.tensor([r[context : context + steps] for r in rows])  # (B, M) inputs
    target = torch.tensor([r[context + 1 : context + steps + 1] for r in rows])  # (B, M) next tokens
    results, ref = {}, None
    for setting in progress(settings, desc=f"text {context}", unit="setting"):
        runner.use(setting, [context] * len(rows))
        logp = runner.decode(cont).log_softmax(-1).cpu()  # (B, M, V)
        nll = -logp.gather(-1, target[..., None])[..., 0]  # (B, M)
        row = {"nll": float(nll.mean()), "ppl": math.exp(float(nll.mean())),
               "attended_fraction": runner.selected_fraction()}
        if ref is None:  # the first setting is full attention
            ref = logp
        else:
            kl = (ref.exp() * (ref - logp)).sum(-1)  # (B, M)  KL(full || sparse)
            row.update(kl=float(kl.mean()), top1_agreement=float((ref.argmax(-1) == logp.argmax(-1)).float().mean()))
        results[setting.label] = row
    full = results[settings[0].label]
    for row in results.values():
        row["ppl_delta"] = row["ppl"] - full["ppl"]
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
    """items: objects with ``context_ids``, ``question_ids`` and ``candidates`` (token lists,
    the right answer first). The context is prefilled; the question and the answers are
    decoded under each setting. An item scores 1 when the right answer is the most likely."""
    scores = {s.label: [] for s in settings}
    for item in progress(items, desc="tasks", unit="item"):
        n_ctx = len(item.context_ids)
        runner.prefill([item.context_ids])
        q = torch.tensor([item.question_ids])
        for setting in settings:
            runner.use(setting, [n_ctx])
            first = runner.decode(q)[0, -1].log_softmax(-1)
            prefix = n_ctx + len(item.question_ids)
            lp = [answer_logprob(runner, first, prefix, c) for c in item.candidates]
            scores[setting.label].append(float(max(range(len(lp)), key=lp.__getitem__) == 0))
    return {k: {"accuracy": sum(v) / max(len(v), 1), "items": len(v)} for k, v in scores.items()}
