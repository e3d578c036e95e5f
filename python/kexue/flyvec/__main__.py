"""``python -m kexue.flyvec train CORPUS --out DIR``, ``... neighbors DIR WORD``, ``... evaluate DIR PAIRS...``."""

from __future__ import annotations

import argparse
import sys

from kexue.flyvec.model import FlyVec
from kexue.flyvec.storage import ModelFileError
from kexue.flyvec.trainer import TrainConfig, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kexue.flyvec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model on a text file (one sentence a line; .gz/.bz2 ok)")
    t.add_argument("corpus")
    t.add_argument("--out", required=True, help="folder for model.pt (a rerun resumes from it)")
    d = TrainConfig()
    for name, typ in (("hidden", int), ("window", int), ("epochs", int), ("batch-size", int), ("lr", float),
                      ("delta", float), ("min-count", int), ("max-vocab", int), ("seed", int),
                      ("hash-length", int)):
        t.add_argument(f"--{name}", type=typ, default=getattr(d, name.replace("-", "_")))
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    n = sub.add_parser("neighbors", help="nearest words by Hamming distance of static hashes")
    n.add_argument("model", help="a model folder (or model.pt)")
    n.add_argument("word")
    n.add_argument("-n", type=int, default=10, help="how many neighbours (default 10)")
    e = sub.add_parser("evaluate", help="Spearman correlation on word-similarity pair files")
    e.add_argument("model", help="a model folder (or model.pt)")
    e.add_argument("pairs", nargs="+", help="tab-separated 'word1 word2 score' files (e.g. wordsim353.tsv)")
    e.add_argument("--similarity", choices=("hash", "dense"), default="hash")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            config = TrainConfig(hidden=args.hidden, window=args.window, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, delta=args.delta,
                                 min_count=args.min_count, max_vocab=args.max_vocab, seed=args.seed,
                                 hash_length=args.hash_length)
            model = train(args.corpus, args.out, config, progress=not args.no_progress)
            print(f"trained: {len(model.vocabulary)} words, K = {model.num_hidden}; model in {args.out}")
            return 0
        model = FlyVec.load(args.model)
        if args.command == "evaluate":
            from kexue.flyvec.evaluate import evaluate

            for path in args.pairs:
                score = evaluate(model, path, args.similarity)
                lo, hi = score.ci95
                print(f"{path}\tspearman {score.spearman:.4f}\t95% [{lo:.3f}, {hi:.3f}]\tpairs {score.pairs}"
                      f"\tskipped {score.skipped}")
            return 0
        for word, dist in model.nearest(args.word.lower(), args.n):
            print(f"{word}\t{dist}")
        return 0
    except (ValueError, KeyError, FileNotFoundError, ModelFileError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
