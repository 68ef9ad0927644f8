"""`make bench`: the generated tables are rewritten, the hand-written notes survive, the GPU section runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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


def test_thread_count_is_pinned_here_and_for_the_timed_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    bench = _bench()
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")  # records the old value (or its absence), which teardown restores
    try:
        bench.fix_threads(1)
        assert torch.get_num_threads() == 1
        assert bench.os.environ["OMP_NUM_THREADS"] == "1" and bench.os.environ["MKL_NUM_THREADS"] == "1"
        assert "torch threads 1;" in bench.machine()
    finally:
        torch.set_num_threads(before)


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


def test_a_full_run_keeps_stamped_sections_it_did_not_measure(tmp_path: Path) -> None:
    """A full `make bench` on a CPU does not run the GPU-only section: its earlier stamped tables stay."""
    bench = _bench()
    out = tmp_path / "BENCHMARKS.md"
    bench.write_markdown([bench.Row("mc", "fast path", 5.0, "s")], "make bench", out, 1.0, machine_line="m")
    out.write_text(out.read_text() + f"\n{bench.NOTES_MARKER}\n\nnotes\n")
    bench.write_markdown([bench.Row("paper scale: x", "edit", 3.0, "ms")], "make bench ARGS='--only paper_scale'",
                         out, 1.0, partial=True, machine_line="gpu")
    text = bench.write_markdown([bench.Row("mc", "fast path", 4.0, "s")], "make bench", out, 1.0, machine_line="m")
    assert "| fast path | 4 s |" in text and "| edit | 3 ms |" in text and "ARGS='--only paper_scale'" in text
    assert text.rstrip().endswith("notes")


@pytest.mark.slow
def test_paper_scale_section_runs_end_to_end_on_small_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The section a lent GPU runs (device time is scarce): every row, on shapes shrunk to test size."""
    from ember import model_shapes

    bench = _bench()
    small = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    monkeypatch.setitem(model_shapes.PAPER_SHAPES, "gemma2_2b", ("gemma2", dict(
        vocab_size=1000, head_dim=128, tie_word_embeddings=True, **small)))
    monkeypatch.setitem(model_shapes.PAPER_SHAPES, "llama31_8b", ("llama", dict(
        vocab_size=1000, tie_word_embeddings=False, **small)))
    rows = bench.bench_paper_scale(bench.BenchOptions(repeats=1))
    by_section: dict[str, list] = {}
    for r in rows:
        by_section.setdefault(r.section, []).append(r)
    assert [s.split(" (")[0] for s in by_section] == ["paper scale: gemma2_2b_shape", "paper scale: llama31_8b_shape"]
    for section, got in by_section.items():
        names = [r.name for r in got]
        assert "factorization K=100, project default (plateau)" in names, section
        plateau = got[names.index("factorization K=100, project default (plateau)")]
        assert plateau.baseline is not None and plateau.ratio is not None  # beside the reference, same run
        assert "reference rule (tol 1e-4, patience 500)" in " ".join(names)  # and the float64 rule-only figure
        n_vprime = [int(got[names.index(n)].note.split("|V'|=")[1].split(",")[0].split(";")[0]) for n in (
            "factorization K=100, the reference (its rule: tol 1e-4, patience 500; float32)",
            "factorization K=100, project default background (neutral + other concepts + general)")]
        assert 0 < n_vprime[0] < n_vprime[1]  # the wider background brings more tokens into V'
        edit, edit_all = (got[names.index(n)] for n in ("restore + edit (delta 10)",
                                                        "restore + edit (delta 10), every feature selected"))
        n_tokens = [int(r.note.split(" tokens")[0]) for r in (edit, edit_all)]
        assert 0 < n_tokens[0] <= n_tokens[1]
        assert all(r.value > 0 for r in got)
    mc = [r for r in rows if r.name.startswith("MC, log-likelihood")]
    assert len(mc) == 1 and mc[0].baseline is not None and mc[0].section.startswith("paper scale: gemma2_2b_shape")


def test_training_baselines_train_what_they_say(tiny) -> None:
    """The training rows' baselines do the work their names claim: the bare GA loop updates the
    method's tensors, the reference RMU only the down-projections of its layers, the reference
    relearning every parameter, embeddings included."""
    import copy

    import torch

    from ember.data import ConceptStore
    from ember.methods import get_method
    from ember.paths import STARTER_DIR

    bench = _bench()
    store = ConceptStore(STARTER_DIR)
    hp = store.concept("Harry Potter")
    tok = tiny.tokenizer

    def changed(run) -> set[str]:
        model = copy.deepcopy(tiny.model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        run(model)
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    ga = get_method("ga", {"steps": 2, "batch_size": 4, "max_length": 32, "lr": 1e-2})
    got = changed(lambda m: bench.bare_ga_loop(m, tok, ga, hp.sentences[:8], 42, tiny.facts.n_layers))
    assert got == {n for n, _ in ga.trainable_params(tiny.model, tiny.facts.n_layers)}
    rmu = get_method("rmu", {"steps": 2, "batch_size": 4, "max_length": 32, "layer": 1, "lr": 1e-2})
    got = changed(lambda m: bench.reference_rmu(m, tok, rmu, hp.sentences[:8], store.neutral[:8], 42, tiny.facts))
    assert got == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    short = copy.copy(hp)
    short.mc = {k: v[:2] for k, v in hp.mc.items()}
    got = changed(lambda m: bench.reference_relearn(m, tok, short, n_paragraphs=2, max_length=64))
    assert "model.embed_tokens.weight" in got and len(got) == len(list(tiny.model.parameters()))
