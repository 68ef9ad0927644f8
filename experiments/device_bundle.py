"""Pack what `make bench ARGS='--only paper_scale'` needs on a bare GPU machine into ``.device/``.

The GPU machines lent to sessions (the `device` tool) have torch and transformers but not this
project's packaged models, Hydra, or the paper's data beside the checkout, and they cannot reach
the internet. This writes, into the git-ignored ``.device/`` folder:

- ``tokenizers/<preset>``: the stand-in tokenizers of the paper-shaped models, saved;
- ``release/``: a transfer copy of the paper's concept data (never committed; removed by the next run);
- ``wheels/``: the pure-Python packages the bench imports that the machine lacks, as wheels (one is
  published only as source, so it is built here: the machine installs with ``--no-index``).

It prints the command to give the device tool, with ``carry: [".device"]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the device image lacks these (its package list: /work/.library/device/KINDS.md); pure Python, any platform
WHEELS = ["hydra-core", "omegaconf", "antlr4-python3-runtime"]


def main() -> None:
    from importlib import metadata

    from ember.config import model_preset
    from ember.models import load_model
    from experiments.bench import PAPER_SHAPE_PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".device")
    ap.add_argument("--release-dir", type=Path, default=ROOT.parent / "shared" / "ember-release")
    args = ap.parse_args()
    out: Path = args.out
    if not (args.release_dir / "concept_sentences.json").exists():  # before the old bundle is removed
        sys.exit(f"--release-dir {args.release_dir}: no concept_sentences.json there; point it at ember-release")
    if out.exists():  # the release copy keeps its read-only modes: make them writable to remove it
        for p in out.rglob("*"):
            p.chmod(p.stat().st_mode | 0o700 if p.is_dir() else p.stat().st_mode | 0o600)
        shutil.rmtree(out)
    for preset in PAPER_SHAPE_PRESETS:
        source = model_preset(preset).tokenizer_from
        tok = load_model(model_preset(source), tokenizer_only=True).tokenizer
        tok.save_pretrained(out / "tokenizers" / source)
    shutil.copytree(args.release_dir, out / "release")
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(out / "wheels"), *pins],
                   check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB). On the device (carry: [\".device\"]):")
    print("  set -o pipefail; cp BENCHMARKS.md $OUT/ && python3 -m pip install -q --no-index --no-deps --target "
          "/tmp/site .device/wheels/* && PYTHONPATH=/tmp/site:$PWD EMBER_RELEASE_DIR=.device/release "
          "HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 experiments/bench.py --only paper_scale "
          "--stand-in-tokenizers .device/tokenizers --out $OUT/BENCHMARKS.md 2>&1 | tee $OUT/bench.log")


if __name__ == "__main__":
    main()
