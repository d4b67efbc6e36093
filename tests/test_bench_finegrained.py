"""benchmarks/bench_finegrained.py in its smoke mode: it trains two variants through the real trainer, evaluates the
saved models and writes a table and a JSON with every expected key. No quality is asserted (3 steps of a tiny
model); the measured numbers are in docs/finegrained.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_finegrained", ROOT / "benchmarks" / "bench_finegrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_writes_table_and_json(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "results.json"
    results = bench.main(["--smoke", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["table"] == results["table"] and saved["smoke"] and saved["seeds"] == [0]
    assert list(saved["table"]) == ["longclip", "finelip"]
    assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [("longclip", 0), ("finelip", 0)]
    headline = {"long_t2i_R@1", "long_i2t_R@1", "short_t2i_R@1", "short_i2t_R@1", "binding", "wall_s"}
    headline |= {f"binding_{t}" for t in bench.NEGATIVE_TYPES}
    for variant, stats in saved["table"].items():
        assert headline <= set(stats), (variant, headline - set(stats))
        for value in stats.values():
            assert {"mean", "std", "min", "max", "n"} == set(value) and value["n"] == 1
            assert value["min"] <= value["mean"] <= value["max"]
    # FineLIP's own scorings are evaluated too; Long-CLIP has only the global one
    assert {"clim:binding", "fused:binding", "clim:long_t2i_R@1"} <= set(saved["table"]["finelip"])
    assert not any(":" in key for key in saved["table"]["longclip"])
    for run in saved["runs"]:
        assert run["summary"]["finished"] and run["summary"]["global_step"] == 3 and run["wall_s"] > 0
        assert {"before", "after"} <= set(run["summary"]["evaluations"])
        assert {"short_t2i_chance", "short_i2t_chance", "short_num_distinct"} <= set(run["extra"]["global"])
    # the printed table names every variant and column; --table reprints it from the JSON
    for word in ("longclip", "finelip", "long t2i", "short i2t", "binding", "swap", "wall s", "clim"):
        assert word in printed
    bench.main(["--table", str(out)])
    assert "finelip" in capsys.readouterr().out
