"""Run the retrieval suite: full attention and sparse settings on the same items, greedy decoding.

One prefill of each item's context serves every setting. Two decoding modes:

- ``prefilled``: the question is attended exactly (full attention), as ``generate`` prefills
  a whole prompt; only the answer is decoded under the setting.
- ``sparse-question``: the question's tokens are decoded under the setting too, as a
  follow-up turn over a long cached context would be.

Items of one family and length batch together (they have equal prompt and question lengths).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from kvdrive.errors import KvdriveError
from kvdrive.eval import retrieval
from kvdrive.eval.harness import Runner, Setting, attended_share
from kvdrive.progress import progress

MODES = ("prefilled", "sparse-question")
DEPTH_BINS = 5


class Greedy:
    """Greedy decoding of a batch of rows on a ``Runner``, recording the attended share."""

    def __init__(self, runner: Runner, global_layers: list[int]):
        self.runner, self.layers = runner, global_layers
        self.attended: list[float] = []  # per decode step: mean over global layers and rows

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) float32 of one decode step of every row."""
        cache, model = self.runner.cache, self.runner.model
        seqs = list(range(tokens.shape[0]))
        b = cache.plan(seqs, 1)
        logits = model(tokens[:, None].to(model.device), cache, b)
        cache.commit(b)
        self._record([cache.length(s) for s in seqs])
        return logits.float()

    def _record(self, lens: list[int]) -> None:
        cache = self.runner.cache
        self.attended.append(attended_share(cache, self.layers, lens))
        cache.last_selection.clear()

    def generate(self, first: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy ids (B, n) from the first-token logits (B, V)."""
        out = [first.argmax(-1).cpu()]
        for _ in range(n - 1):
            out.append(self.step(out[-1]).argmax(-1).cpu())
        return torch.stack(out, 1)

    def force(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-force tokens (B, M); the logits after the last (B, V)."""
        logits = None
        for t in range(tokens.shape[1]):
            logits = self.step(tokens[:, t])
        return logits


def run_family(
    runner: Runner,
    tokenizer,
    items: list[retrieval.Item],
    settings: list[Setting],
    modes,
    batch: int,
    global_layers: list[int],
) -> dict:
    """Outcomes of every (setting, mode) on ``items``: {label: {mode: {"right": [bool], "attended": float}}}."""
    out = {s.label: {m: {"right": [], "attended": []} for m in modes} for s in settings}
    for start in progress(
        range(0, len(items), batch), desc=f"{items[0].family} {len(items[0].prompt_ids)}", unit="batch"
    ):
        t0 = time.perf_counter()
        rows = items[start : start + batch]
        n_ctx = len(rows[0].context_ids)
        if any(len(r.context_ids) != n_ctx or len(r.question_ids) != len(rows[0].question_ids) for r in rows):
            raise KvdriveError("items of one batch must have equal context and question lengths")
        n_prompt = len(rows[0].prompt_ids)
        new = max(r.max_new_tokens for r in rows)
        question = torch.tensor([r.question_ids for r in rows])
        runner.prefill([list(r.context_ids) for r in rows])  # exact, whatever the setting
        greedy = Greedy(runner, global_layers)
        exact_first = None
        if "prefilled" in modes:  # the question attended exactly, shared by every setting
            runner.use(Setting(None, 1.0), [n_ctx] * len(rows))
            exact_first = greedy.force(question)
        for setting in settings:
            for mode in modes:
                if mode == "prefilled":
                    runner.use(setting, [n_prompt] * len(rows))
                    first = exact_first
                else:
                    runner.use(setting, [n_ctx] * len(rows))
                    first = greedy.force(question)
                greedy.attended.clear()
                ids = greedy.generate(first, new)
                for r, row_ids in zip(rows, ids.tolist()):
                    out[setting.label][mode]["right"].append(retrieval.score(r, tokenizer.decode(row_ids)))
                out[setting.label][mode]["attended"] += greedy.attended
        print(
            f"{rows[0].family} {n_prompt}: {len(rows)} items in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return out


def summarize(items: list[retrieval.Item], outcomes: dict, settings: Sequence[Setting] = ()) -> dict:
    """Accuracy with intervals, the paired difference to full attention (and, for a compressed
    storage format among ``settings``, to the same setting over bf16 KV), accuracy per depth bin."""
    full = outcomes["full"]
    twin = {s.label: s.in_bf16.label for s in settings if s.kv_dtype != "bf16"}
    bins = [min(int(it.depth * DEPTH_BINS), DEPTH_BINS - 1) for it in items]
    result = {}
    for label, by_mode in outcomes.items():
        result[label] = {}
        for mode, o in by_mode.items():
            right = o["right"]
            k, n = sum(right), len(right)
            row = {
                "correct": k,
                "items": n,
                "accuracy": k / n,
                "interval": list(retrieval.wilson(k, n)),
                "attended": sum(o["attended"]) / max(len(o["attended"]), 1),
            }
            if label != "full":
                row["vs_full"] = retrieval.paired_difference(full[mode]["right"], right)
            if twin.get(label) in outcomes:
                row["vs_bf16"] = retrieval.paired_difference(outcomes[twin[label]][mode]["right"], right)
            row["by_depth"] = {
                f"{b / DEPTH_BINS:.1f}-{(b + 1) / DEPTH_BINS:.1f}": sum(r for r, bb in zip(right, bins) if bb == b)
                / bins.count(b)
                for b in range(DEPTH_BINS)
                if bins.count(b)
            }
            result[label][mode] = row
    return result


RETRIEVAL_NOTES = [
    "retrieval: right = the first run of digits in the greedy continuation equals the answer",
    (
        "prefilled: context and question attended exactly, the answer decoded under the setting; "
        "sparse-question: the question decoded under the setting too"
    ),
    (
        "interval: 95% Wilson; vs_full: paired difference to full attention on the same items (lost = full right and "
        "this setting wrong), 95% interval by Newcombe's method for paired proportions; vs_bf16: the same against "
        "the setting over bf16 KV, for a compressed storage format"
    ),
    (
        "attended: share of the context attended per decode step, averaged over global layers (dense ones count 1) "
        "and rows"
    ),
]
