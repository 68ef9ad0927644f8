"""Evaluation suite: multiple choice, open QA, retention, coherence and the paper's metrics."""
