"""Worked run: kexue in a Llama model it did not write, trained on CPU and evaluated at 4x length.

A tiny Llama-style model (transformers' ``LlamaForCausalLM`` from a config; nothing is downloaded)
learns byte-level language modelling on the Python reference text that ships with CPython
(``pydoc_data.topics``). The same model, data order and schedule are trained with:

* ``stock``: ``torch.optim.AdamW`` and transformers' SDPA attention;
* ``kexue``: ``kexue.optim.Tiger`` and kexue's log-n attention (``kexue.patch``);
* and, to tell the two changes apart, ``adamw+logn`` and ``tiger+sdpa``.

Each run is evaluated on held-out text at the training length and at ``--eval-factor`` times it.
The script writes ``worked_run.json`` (losses, perplexities, settings), ``worked_run.png`` (loss
curves) and ``worked_run.md`` (the README's table) to ``--out``. ``python examples/worked_run.py
--help`` lists the knobs; the defaults take a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import kexue

RUNS = {
    "stock": ("adamw", "sdpa"),
    "kexue": ("tiger", "logn"),
    "adamw+logn": ("adamw", "logn"),
    "tiger+sdpa": ("tiger", "sdpa"),
}


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes of CPython's pydoc topics text: (train, held-out), the last 10% held out."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def model_config(args) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=args.width,
        intermediate_size=args.width * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=args.train_len * args.eval_factor,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def make_optimizer(name: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    if name == "adamw":
        # Matrices decay; norm gains and the (tied) embedding do not, as GPT-style recipes do.
        decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
        other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
        groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=other, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adamw_betas))
    # Tiger's lr is relative: each matrix moves by lr * RMS(matrix) per step, embedding rows by
    # lr * RMS(row), norm gains by 0.5 * lr (tiger_param_groups sorts the tensors into those kinds).
    return kexue.optim.Tiger(
        kexue.optim.tiger_param_groups(model),
        lr=args.tiger_lr,
        beta=args.tiger_beta,
        weight_decay=args.weight_decay,
        elementwise_lr=args.tiger_elementwise_lr,
    )


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def windows(data: torch.Tensor, length: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


def train(run: str, args, train_data: torch.Tensor) -> tuple[LlamaForCausalLM, dict]:
    optimizer_name, attention = RUNS[run]
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = LlamaForCausalLM(model_config(args))
    if attention == "logn":
        kexue.patch(model, train_len=args.train_len)
    optimizer = make_optimizer(optimizer_name, model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, args.steps, args.warmup))
    data_order = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every run
    losses, start = [], time.perf_counter()
    model.train()
    for _ in range(args.steps):
        ids = windows(train_data, args.train_len, args.batch, data_order)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return model, dict(
        optimizer=optimizer_name, attention=attention, losses=losses, train_seconds=time.perf_counter() - start
    )


@torch.no_grad()
def perplexity(
    model: LlamaForCausalLM, data: torch.Tensor, length: int, max_windows: int, beyond: int | None = None
) -> float:
    """exp(mean next-byte NLL) over consecutive non-overlapping held-out windows of ``length``.

    With ``beyond``, only the bytes predicted at positions ``>= beyond`` count: the part of a long
    window that lies past the training length, where extrapolation shows.
    """
    model.eval()
    count = min(max_windows, (len(data) - 1) // length)
    ids = data[: count * length].view(count, length)
    start = 0 if beyond is None else beyond - 1  # logits at position p predict byte p + 1
    total, tokens = 0.0, 0
    for chunk in ids.split(8):
        logits = model(input_ids=chunk, use_cache=False).logits[:, start:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, start + 1 :].flatten(), reduction="sum")
        total, tokens = total + nll.item(), tokens + logits.shape[0] * logits.shape[1]
    return math.exp(total / tokens)


def plot(results: dict, path: pathlib.Path, smooth: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, result in results["runs"].items():
        losses = torch.tensor(result["losses"])
        k = min(smooth, len(losses))
        smoothed = losses.unfold(0, k, 1).mean(1)
        ax.plot(
            range(k, len(losses) + 1), smoothed.tolist(), label=f"{run} ({result['optimizer']}, {result['attention']})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (nats/byte, mean of {smooth} steps)")
    ax.set_title(f"tiny Llama, byte-level, train length {results['settings']['train_len']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The results as the README's table: one row per run, perplexity at each evaluated length."""
    lengths = list(next(iter(results["runs"].values()))["perplexity"])
    head = [
        "| run | optimizer | attention | final train loss | "
        + " | ".join(f"ppl @ {n}" for n in lengths)
        + " | train time |",
        "|---" * (5 + len(lengths)) + "|",
    ]
    rows = []
    for run, r in results["runs"].items():
        last = r["losses"][-20:]
        ppl = " | ".join(f"{r['perplexity'][n]:.2f}" for n in lengths)
        rows.append(
            f"| {run} | {r['optimizer']} | {r['attention']} | {sum(last) / len(last):.3f} | {ppl} | "
            f"{r['train_seconds']:.0f} s |"
        )
    m = results["machine"]
    return "\n".join(head + rows) + (
        f"\n\n{m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers "
        f"{m['transformers']}, kexue {m['kexue']}.\n"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-len", type=int, default=128)
    parser.add_argument("--eval-factor", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    # Defaults from a small 150-step sweep of each optimizer with SDPA (README, "Worked run"):
    # AdamW lr 1e-3, 3e-3, 6e-3 at betas (0.9, 0.95), then (0.8, 0.95) and (0.9, 0.99) at 3e-3;
    # Tiger lr 1e-2, 3e-2, 1e-1 at beta 0.965, 3e-2 and 5e-2 at 0.9, 1e-2, 2e-2, 3e-2 at 0.8.
    # Short runs with batches of 16 favour little momentum, for both.
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak lr")
    parser.add_argument("--adamw-betas", type=float, nargs=2, default=[0.8, 0.95])
    parser.add_argument("--tiger-lr", type=float, default=3e-2, help="Tiger's peak relative lr")
    parser.add_argument("--tiger-beta", type=float, default=0.8)
    parser.add_argument(
        "--tiger-elementwise-lr",
        type=float,
        default=0.5,
        help="Tiger's lr multiplier for norm gains (absolute lr = this * tiger-lr)",
    )
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent.parent / "docs" / "worked_run"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_data, held_out = corpus()
    lengths = (args.train_len, args.train_len * args.eval_factor)
    results = dict(
        settings={k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
        machine=dict(
            cpu=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            kexue=kexue.__version__,
        ),
        runs={},
    )
    for run in args.runs:
        model, result = train(run, args, train_data)
        windows_at = {n: max(1, args.eval_windows * args.train_len // n) for n in lengths}
        result["perplexity"] = {str(n): perplexity(model, held_out, n, windows_at[n]) for n in lengths}
        long = lengths[-1]
        result["perplexity"][f"{long}, positions >= {args.train_len}"] = perplexity(
            model, held_out, long, windows_at[long], beyond=args.train_len
        )
        results["runs"][run] = result
        ppl = ", ".join(f"length {n}: {p:.3f}" for n, p in result["perplexity"].items())
        print(
            f"{run:>11}: final loss {sum(result['losses'][-20:]) / min(20, len(result['losses'])):.3f}, "
            f"held-out perplexity {ppl}, {result['train_seconds']:.0f} s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worked_run.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "worked_run.png")
    (args.out / "worked_run.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
