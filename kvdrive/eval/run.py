"""``evaluate``: the whole accuracy study of ``kvdrive eval`` for one model."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from kvdrive.cache.sparse import SparseConfig
from kvdrive.errors import KvdriveError
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.sweep import task_sweep, text_sweep

CALIB_TOKENS = 16384  # tokens of calibration text for the offline low-rank bases
CALIB_ROW = 4096


@dataclass(frozen=True)
class EvalSpec:
    model: str | None = None
    device: str = "auto"
    dtype: str | None = None
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    budgets: tuple[float, ...] = (0.0156, 0.03, 0.0625, 0.125)
    summaries: tuple[str, ...] = ("minmax", "mean", "lowrank_offline", "lowrank_seq")
    rank: int = 32
    dense_layers: tuple[int, ...] = ()
    mode: str = "shared"
    group_tokens: int = 16
    sink: int = 16
    window: int = 64
    steps: int = 64
    samples: int = 2
    tasks: tuple[str, ...] = ("needle", "multikey", "vartrack", "cwe")
    items: int = 3
    text: str = "austen"
    seed: int = 0
    recall: bool = False  # measure next-layer prediction recall per layer on the text sweep

    def settings(self) -> list[Setting]:
        return [Setting(None, 1.0)] + [Setting(s, b, self.mode) for s in self.summaries for b in self.budgets]


def text_rows(ids: list[int], length: int, steps: int, samples: int, rng: random.Random) -> list[list[int]]:
    need = length + steps + 1
    if len(ids) < need * samples:
        raise KvdriveError(f"the text has {len(ids)} tokens; {samples} samples of {need} need more: fewer --samples")
    span = len(ids) // samples
    starts = [i * span + rng.randrange(0, span - need + 1) for i in range(samples)]
    return [ids[s : s + need] for s in starts]


def load_model_and_text(spec) -> tuple:
    """(model, text, token ids of the text) for a spec with ``model``, ``device``, ``dtype``,
    ``lengths``, ``steps`` and ``text`` (``EvalSpec``, ``HitsSpec``); refuses lengths beyond
    the model's context."""
    from kvdrive.eval import corpus
    from kvdrive.models.loader import load_model

    lm = load_model(spec.model, device=spec.device, dtype=spec.dtype)
    if lm.tokenizer is None:
        raise KvdriveError(f"{lm.source} has no tokenizer; evaluation needs real text")
    too_long = [n for n in spec.lengths if n + spec.steps + 64 > lm.config.max_position_embeddings]
    if too_long:
        raise KvdriveError(f"lengths {too_long} exceed the model's context {lm.config.max_position_embeddings}")
    text = corpus.load_text(spec.text, fetch_missing=True)
    return lm, text, lm.tokenizer(text.text, add_special_tokens=False)["input_ids"]


def evaluate(spec: EvalSpec, out: str | Path, plot: str | Path | None = None) -> Path:
    from kvdrive.eval import tasks

    lm, text, ids = load_model_and_text(spec)
    rng = random.Random(spec.seed)
    bases = None
    if "lowrank_offline" in spec.summaries:
        # Calibration text is the corpus's first CALIB_TOKENS tokens; evaluation never reads them.
        from kvdrive.eval.calibrate import fit_bases

        calib, ids = ids[:CALIB_TOKENS], ids[CALIB_TOKENS:]
        bases = fit_bases(lm, [calib[i : i + CALIB_ROW] for i in range(0, len(calib), CALIB_ROW)], spec.rank)
    base = SparseConfig(group_tokens=spec.group_tokens, sink_tokens=spec.sink, window_tokens=spec.window,
                        rank=spec.rank, bases=bases, dense_layers=spec.dense_layers)
    settings = spec.settings()
    results = []
    for length in spec.lengths:
        rows = text_rows(ids, length, spec.steps, spec.samples, rng)
        runner = Runner(lm, spec.samples, length + spec.steps + 8, base)
        entry = {"length": length, "text": text_sweep(runner, rows, length, settings, spec.recall)}
        results.append(entry)
        _write(spec, lm, text, bases, out, results)  # partial results survive an interrupted run
        if spec.tasks:
            items = tasks.make_suite(lm.tokenizer, text.text, tasks.SuiteSpec(length, spec.tasks, spec.items,
                                                                              seed=spec.seed))
            runner = Runner(lm, 1, max(len(i.prompt_ids) + max(map(len, i.candidates)) for i in items), base)
            entry["tasks"] = {}
            for fam in spec.tasks:
                entry["tasks"][fam] = task_sweep(runner, [i for i in items if i.family == fam], settings)
                _write(spec, lm, text, bases, out, results)
        print(f"length {length}: done", flush=True)
    path = _write(spec, lm, text, bases, out, results)
    if plot:
        from kvdrive.eval.plot import plot_eval

        plot_eval(path, plot)
    return path


def _write(spec, lm, text, bases, out, results) -> Path:
    from kvdrive.results import write_result

    config = {**asdict(spec), "model": lm.source, "calibration": f"first {CALIB_TOKENS} tokens of the text"
              if bases else None, "text_source": text.source, "text_licence": text.licence,
              "model_dtype": str(lm.model.dtype), "device": str(lm.model.device)}
    notes = ["reference = full attention (the sparse cache with a budget covering the context, proven equal in tests)",
             "KL is KL(full || sparse) per teacher-forced token; top1 = argmax agreement",
             "recall (with --recall): per sparse layer L, the share of the groups the true query selected "
             "(sinks and window excluded) that a query predicted from layer L-1's input hidden state through "
             "layer L's input norm, Wq and RoPE also selects, same summaries and budget; mean over steps and "
             "sequences of the text sweep",
             "tasks: the context is prefilled exactly; the question and every candidate answer are decoded under "
             "the setting; an item is right when the true answer is the most likely candidate"]
    return write_result(out, "eval", config, results, notes)
