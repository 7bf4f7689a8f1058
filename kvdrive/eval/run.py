"""``evaluate``: the whole accuracy study of ``kvdrive eval`` for one model."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kvdrive.cache.sparse import SparseConfig, default_budget
from kvdrive.errors import KvdriveError
from kvdrive.eval import retrieval, setting_spec
from kvdrive.eval.harness import Runner, Setting
from kvdrive.eval.retrieval_sweep import RETRIEVAL_NOTES, run_family, summarize
from kvdrive.eval.sweep import text_sweep
from kvdrive.quant.formats import KV_DTYPES
from kvdrive.retrieval.summaries import SUMMARIZERS

CALIB_TOKENS = 16384  # tokens of calibration text for the offline low-rank bases
CALIB_ROW = 4096


DEFAULT_BUDGETS = (0.0625, 0.25)  # beside the model's default budget (``default_budget``)


@dataclass(frozen=True)
class EvalSpec:
    model: str | None = None
    device: str = "auto"
    dtype: str | None = None
    lengths: tuple[int, ...] = (4096, 8192)
    budgets: tuple[float, ...] | None = None  # None: DEFAULT_BUDGETS and the model's default budget
    summaries: tuple[str, ...] = ("mean", "tokenmax")
    rank: int = 32
    dense_layers: tuple[int, ...] = ()
    mode: str = "shared"
    group_tokens: int = 16
    sink: int = 16
    window: int = 64
    steps: int = 64
    samples: int = 2
    families: tuple[str, ...] = retrieval.FAMILIES
    items: int = 100
    modes: tuple[str, ...] = ("prefilled",)
    batch: int = 8
    text: str = "kjv"
    seed: int = 0
    recall: bool = False  # measure next-layer prediction recall per layer on the text sweep
    kv_dtypes: tuple[str, ...] = ("bf16",)  # storage formats of the tiers below the GPU, each measured

    def settings(self) -> list[Setting]:
        """Full attention, then every summary x budget, per storage format (bf16 first, so a
        compressed setting meets its bf16 twin). A summary ``name[+dense=L,L][/mode][@budget]``
        (``setting_spec``) overrides the dense layers or ``mode`` (``oracle/per_head`` beside
        shared summaries) or runs at that one budget only.
        A compressed format also runs full attention over its KV (its error alone)."""
        sparse = []
        for s in self.summaries:
            p = setting_spec.parse(s, tuple(SUMMARIZERS))
            budgets = (p.budget,) if p.budget is not None else (self.budgets or DEFAULT_BUDGETS)
            sparse += [Setting(p.name, b, p.mode or self.mode, dense=p.dense) for b in budgets]
        out = [Setting(None, 1.0)]
        for fmt in KV_DTYPES:  # bf16 first, then in a fixed order
            if fmt not in self.kv_dtypes:
                continue
            extra = [] if fmt == "bf16" else [Setting(None, 1.0, kv_dtype=fmt)]
            out += [replace(s, kv_dtype=fmt) for s in extra + sparse]
        return out


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


def with_model_budgets(spec: EvalSpec, config) -> EvalSpec:
    """``spec`` with ``budgets=None`` replaced by ``DEFAULT_BUDGETS`` and the budget a user of this
    model runs by default (``default_budget``), so the report covers the configuration in use."""
    if spec.budgets is not None:
        return spec
    return replace(spec, budgets=tuple(sorted({*DEFAULT_BUDGETS, default_budget(config)})))


def evaluate(spec: EvalSpec, out: str | Path, plot: str | Path | None = None) -> Path:
    lm, text, ids = load_model_and_text(spec)
    spec = with_model_budgets(spec, lm.config)
    rng = random.Random(spec.seed)
    bases = None
    if "lowrank_offline" in spec.summaries:
        # Calibration text is the corpus's first CALIB_TOKENS tokens; evaluation never reads them.
        from kvdrive.eval.calibrate import fit_bases

        calib, ids = ids[:CALIB_TOKENS], ids[CALIB_TOKENS:]
        bases = fit_bases(lm, [calib[i : i + CALIB_ROW] for i in range(0, len(calib), CALIB_ROW)], spec.rank)
    base = SparseConfig(
        group_tokens=spec.group_tokens,
        sink_tokens=spec.sink,
        window_tokens=spec.window,
        rank=spec.rank,
        bases=bases,
        dense_layers=spec.dense_layers,
    )
    settings = spec.settings()
    results = []
    builder = retrieval.Builder(lm.tokenizer, text.text) if spec.families else None
    global_layers = list(lm.config.global_layers)
    for length in spec.lengths:
        rows = text_rows(ids, length, spec.steps, spec.samples, rng)
        runner = Runner(lm, spec.samples, length + spec.steps + 8, base)
        entry = {"length": length, "text": text_sweep(runner, rows, length, settings, spec.recall)}
        results.append(entry)
        _write(spec, lm, text, bases, out, results)  # partial results survive an interrupted run
        if spec.families:
            entry["retrieval"] = {}
            for fam in spec.families:
                items = builder.build(fam, length, spec.items, spec.seed)
                batch = min(spec.batch, len(items))
                runner = Runner(lm, batch, length + max(i.max_new_tokens for i in items) + 8, base)
                outcomes = run_family(runner, lm.tokenizer, items, settings, spec.modes, batch, global_layers)
                entry["retrieval"][fam] = {"items": len(items), "settings": summarize(items, outcomes, settings)}
                _write(spec, lm, text, bases, out, results)
        print(f"length {length}: done", flush=True)
    path = _write(spec, lm, text, bases, out, results)
    if plot:
        from kvdrive.eval.plot import plot_eval

        plot_eval(path, plot)
        if spec.families:
            from kvdrive.eval.retrieval_plot import plot_retrieval

            plot_retrieval(path, retrieval_png(plot))
    return path


def retrieval_png(plot: str | Path) -> Path:
    """Where the retrieval plot goes beside the text plot ``plot``."""
    plot = Path(plot)
    return plot.with_name(f"{plot.stem}-retrieval{plot.suffix or '.png'}")


def _write(spec, lm, text, bases, out, results) -> Path:
    from kvdrive.results import write_result

    config = {
        **asdict(spec),
        "model": lm.source,
        "calibration": f"first {CALIB_TOKENS} tokens of the text" if bases else None,
        "text_source": text.source,
        "text_licence": text.licence,
        "model_dtype": str(lm.model.dtype),
        "device": str(lm.model.device),
    }
    notes = [
        "reference = full attention (the sparse cache with a budget covering the context, proven equal in tests)",
        "KL is KL(full || sparse) per teacher-forced token; top1 = argmax agreement",
        "a label +fp8, +int8 or +int4: decode attends to full groups as that storage format's round trip returns them "
        "(what the tiered cache fetches from compressed tiers), the open group exact; vs_bf16 compares it "
        "with the same setting over bf16 KV (top1: agreement with its greedy tokens)",
        "recall (with --recall): per sparse layer L, the share of the groups the true query selected "
        "(sinks and window excluded) that a query predicted from layer L-1's input hidden state through "
        "layer L's input norm, Wq and RoPE also selects, same summaries and budget; mean over steps and "
        "sequences of the text sweep",
        *RETRIEVAL_NOTES,
    ]
    return write_result(out, "eval", config, results, notes)
