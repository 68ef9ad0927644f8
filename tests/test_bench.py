"""`make bench` output: the generated tables are rewritten, the hand-written notes survive."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("ember_bench", ROOT / "experiments" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_rewrite_keeps_notes_and_replaces_tables(tmp_path: Path) -> None:
    bench = _bench()
    out = tmp_path / "BENCHMARKS.md"
    old = [bench.Row("mc", "fast path", 5.0, "s", baseline=10.0)]
    bench.write_markdown(old, "make bench", out, 1.0)
    out.write_text(out.read_text() + f"\n{bench.NOTES_MARKER}\n\n## Notes\n\nwhy the goal was missed\n")
    new = [bench.Row("mc", "fast path", 2.0, "s", baseline=10.0)]
    text = bench.write_markdown(new, "make bench", out, 1.0)
    assert "| fast path | 2 s | 10 s | 5.00x |" in text
    assert "| fast path | 5 s |" not in text
    assert text.count(bench.NOTES_MARKER) == 1 and text.rstrip().endswith("why the goal was missed")


def test_ratio_direction() -> None:
    bench = _bench()
    assert bench.Row("x", "t", 2.0, "s", baseline=6.0).ratio == 3.0  # times: baseline / value
    assert bench.Row("x", "q", 6.0, "q/s", baseline=2.0).ratio == 3.0  # rates: value / baseline
    assert bench.Row("x", "t", 2.0, "s").ratio is None


def test_partial_run_replaces_only_its_sections(tmp_path: Path) -> None:
    bench = _bench()
    out = tmp_path / "BENCHMARKS.md"
    full = [bench.Row("mc", "fast path", 5.0, "s", baseline=10.0), bench.Row("training", "one step", 1.5, "s")]
    bench.write_markdown(full, "make bench", out, 1.0, machine_line="test machine")
    out.write_text(out.read_text() + f"\n{bench.NOTES_MARKER}\n\nnotes\n")
    text = bench.write_markdown([bench.Row("mc", "fast path", 2.0, "s", baseline=10.0)], "make bench ARGS='--only mc'",
                                out, 1.0, partial=True, machine_line="test machine")
    assert "| fast path | 2 s | 10 s | 5.00x |" in text and "| fast path | 5 s |" not in text
    assert "| one step | 1.5 s |" in text  # the section it did not measure is kept
    assert "Measured by `make bench ARGS='--only mc'`" in text and text.index("## mc") < text.index("## training")
    assert text.startswith("# Benchmarks") and text.rstrip().endswith("notes")
