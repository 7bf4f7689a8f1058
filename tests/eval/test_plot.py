"""The accuracy-vs-budget plot, from an eval JSON document."""

import json
import sys

import pytest

from kvdrive.errors import KvdriveError
from kvdrive.eval.plot import panels_from_result, plot_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result_doc(modes=("shared",)):
    budgets = (0.0156, 0.03, 0.0625, 0.125)
    labels = [f"{s}@{b:g}/{m}" for s in ("minmax", "mean") for b in budgets for m in modes]
    entries = []
    for length in (2048, 4096):
        text = {"full": {"ppl": 30.0}}
        text.update({lab: {"top1_agreement": 0.5 + 4 * float(lab.split("@")[1].split("/")[0])} for lab in labels})
        retrieval = {
            fam: {
                "items": 5,
                "settings": {
                    "full": {"prefilled": {"accuracy": acc}},
                    **{lab: {"prefilled": {"accuracy": acc / 2}} for lab in labels},
                },
            }
            for fam, acc in (("passkey", 1.0), ("multikey", 0.6))
        }
        entries.append({"length": length, "text": text, "retrieval": retrieval})
    return {"config": {"model": "SmolLM2-135M"}, "results": entries}


def test_panels_hold_one_curve_per_summary_and_metric():
    panels = panels_from_result(result_doc())
    assert [p.title for p in panels] == ["2048 tokens", "4096 tokens"]
    p = panels[0]
    assert p.full_accuracy == pytest.approx(0.8)  # families weigh equally
    assert {(c.summary, c.metric) for c in p.curves} == {(s, m) for s in ("minmax", "mean") for m in ("tasks", "top-1")}
    top1 = next(c for c in p.curves if c.summary == "mean" and c.metric == "top-1")
    assert top1.budgets == (0.0156, 0.03, 0.0625, 0.125)
    assert top1.values == pytest.approx(tuple(0.5 + 4 * b for b in top1.budgets))
    tasks = next(c for c in p.curves if c.metric == "tasks")
    assert tasks.values == pytest.approx((0.4,) * 4)


def test_modes_are_named_when_there_are_several():
    names = {c.summary for c in panels_from_result(result_doc(("shared", "per_head")))[0].curves}
    assert names == {"minmax/shared", "minmax/per_head", "mean/shared", "mean/per_head"}


def test_text_only_result_has_no_task_curves():
    doc = result_doc()
    for e in doc["results"]:
        del e["retrieval"]
    p = panels_from_result(doc)[0]
    assert p.full_accuracy is None and {c.metric for c in p.curves} == {"top-1"}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "eval.json"
    src.write_text(json.dumps(result_doc()))
    out = plot_eval(src, tmp_path / "eval.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    src = tmp_path / "eval.json"
    src.write_text(json.dumps(result_doc()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(KvdriveError, match=r"kvdrive\[plot\]"):
        plot_eval(src, tmp_path / "eval.png")
