"""``python -m kexue.flyvec train CORPUS --out DIR [--preset small]``, ``... neighbors DIR WORD [--corpus CORPUS]``,
``... evaluate DIR PAIRS... [--similarity context-hash --corpus CORPUS]``.

Settings given on the command line override the preset's (``--preset flyvec``, the default:
FlyVec's own, sized for billions of windows; ``--preset small``: a corpus of up to a few million
windows). A rerun with the same ``--out`` resumes; a larger ``--epochs`` trains a finished model further.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from kexue.flyvec.model import FlyVec
from kexue.flyvec.storage import ModelFileError
from kexue.flyvec.trainer import PRESETS, preset, train

_SETTINGS = (
    ("hidden", int),
    ("window", int),
    ("epochs", int),
    ("batch-size", int),
    ("lr", float),
    ("delta", float),
    ("min-count", int),
    ("max-vocab", int),
    ("seed", int),
    ("hash-length", int),
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kexue.flyvec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model on a text file (one sentence a line; .gz/.bz2 ok)")
    t.add_argument("corpus")
    t.add_argument("--out", required=True, help="folder for model.pt (a rerun resumes from it)")
    t.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="flyvec",
        help="flyvec: FlyVec's defaults (batch 10,000, lr 0.002; billions of windows); small: batch "
        "1,000, lr 0.1, 15 epochs (a corpus of up to a few million windows)",
    )
    for name, typ in _SETTINGS:
        t.add_argument(f"--{name}", type=typ, default=None, help="default: the preset's")
    t.add_argument(
        "--stop-words",
        metavar="FILE",
        help="mask the words of FILE (one a line; 'english': the built-in list; default 'none')",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar and no per-epoch lines")
    n = sub.add_parser("neighbors", help="nearest words by Hamming distance of static (or context) hashes")
    n.add_argument("model", help="a model folder (or model.pt)")
    n.add_argument("word")
    n.add_argument("-n", type=_positive_int, default=10, help="how many neighbours (default 10)")
    n.add_argument("--corpus", help="compare context hashes voted by this text's windows (the training corpus)")
    e = sub.add_parser("evaluate", help="Spearman correlation on word-similarity pair files")
    e.add_argument("model", help="a model folder (or model.pt)")
    e.add_argument("pairs", nargs="+", help="tab-separated 'word1 word2 score' files (e.g. wordsim353.tsv)")
    e.add_argument(
        "--similarity",
        choices=("hash", "dense", "context-hash"),
        default="hash",
        help="hash: static hashes (Hamming); dense: cosine of the target synapses; context-hash: "
        "codes voted from the word's most typical windows of --corpus (the best on a small corpus)",
    )
    e.add_argument("--corpus", help="the text whose windows vote the context hashes (the training corpus)")
    e.add_argument(
        "--contexts",
        type=_positive_int,
        default=None,
        help="vote each context hash from the word's N most typical windows (default: all of them)",
    )
    return p


def _stop_words(spec: str) -> tuple[str, ...]:
    if spec == "none":
        return ()
    if spec == "english":
        from kexue.flyvec.stopwords import ENGLISH

        return tuple(ENGLISH)
    with open(spec, encoding="utf-8") as f:
        return tuple(w.strip().lower() for w in f if w.strip() and not w.startswith("#"))


def _config(args: argparse.Namespace):
    overrides = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _ in _SETTINGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.stop_words is not None:
        overrides["stop_words"] = _stop_words(args.stop_words)
    return preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise ValueError(f"--out must be a folder (model.pt is written into it), but {args.out!r} is a file")
            model = train(args.corpus, args.out, _config(args), progress=not args.no_progress)
            words = len(model.vocabulary) - 1  # <UNK> is not a word
            print(f"trained: {words:,} words, K = {model.num_hidden}; model in {args.out}")
            return 0
        model = FlyVec.load(args.model)
        if args.command == "evaluate":
            from kexue.flyvec.evaluate import evaluate, flyvec_similarity

            if args.similarity == "context-hash" and args.corpus is None:
                raise ValueError("--similarity context-hash needs --corpus (the text the model was trained on)")
            if args.similarity != "context-hash" and (args.corpus is not None or args.contexts is not None):
                raise ValueError("--corpus and --contexts go with --similarity context-hash")
            similarity = flyvec_similarity(model, args.similarity, None, args.corpus, args.contexts)
            status = 0
            for path in args.pairs:
                score = evaluate(model, path, similarity)
                if math.isnan(score.spearman):  # too few pairs known, or every similarity tied
                    print(
                        f"{path}\tspearman undefined: {score.why_undefined()}\tpairs {score.pairs}"
                        f"\tskipped {score.skipped}"
                    )
                    status = 1
                    continue
                lo, hi = score.ci95
                interval = f"95% [{lo:.3f}, {hi:.3f}]" if not math.isnan(lo) else "95% interval needs 4 pairs"
                print(
                    f"{path}\tspearman {score.spearman:.4f}\t{interval}\tpairs {score.pairs}\tskipped {score.skipped}"
                )
            return status
        codes = None
        if args.corpus is not None:
            from kexue.flyvec.context import context_hashes

            codes = context_hashes(model, args.corpus)
        for word, dist in model.nearest(args.word.lower(), args.n, codes=codes):
            print(f"{word}\t{dist}")
        return 0
    except (ValueError, TypeError, KeyError, OSError, ModelFileError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
