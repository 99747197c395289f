"""The official LRURec code on a shared target under this project's protocol, side by side.

Trains the official model (`model/lru.py` of github.com/yueqirex/LRURec, imported from
`--official PATH`, never copied here) with the official data and optimizer semantics:
training windows that label every item (the first one from an all-padding input), one
pass over the windows per epoch in a fresh order, AdamW(lr 1e-3, eps 1e-9, weight decay
0.01 except on biases and LayerNorm weights), gradient clipping at 5. What differs from
the official script is the protocol, which is ours (docs/design.md §5): validation
NDCG@10 every epoch, early stopping after `--patience` epochs without improvement,
full ranking with the history excluded but the target kept a candidate, test metrics
of the best-validation parameters.

    git clone https://github.com/yueqirex/LRURec /tmp/lrurec
    python benchmarks/official_lrurec.py --official /tmp/lrurec --dataset amazon-scientific --dropout 0.2 --window 20

Appends one JSON row to benchmarks/results/scientific/official_lrurec.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from common import experiment_dir, header
from torch import nn

from metarec.data.prepare import shared_data_dir
from metarec.eval import ndcg_per_user


def read_sequences(name: str) -> dict[int, list[int]]:
    seqs = {}
    for line in (Path(shared_data_dir()) / f"{name}.txt").read_text().splitlines():
        user, *items = map(int, line.split())
        seqs[user] = items
    return seqs


def training_windows(train: dict[int, list[int]], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training windows: labels = the last `window` items, inputs shifted by one."""
    rows = []
    for user in sorted(train):
        s = train[user]
        rows += [s] if len(s) < 2 * window else [s[i : i + window] for i in range(len(s) - window, -1, -window)]
    inputs, labels = np.zeros((len(rows), window), np.int64), np.zeros((len(rows), window), np.int64)
    for r, s in enumerate(rows):
        lab, tok = s[-window:], s[:-1][-window:]
        inputs[r, window - len(tok):] = tok
        labels[r, window - len(lab):] = lab
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def ranks(model, histories: list[list[int]], targets: list[int], window: int) -> torch.Tensor:
    """1-based ranks of the targets (history excluded, the target kept, ties pessimistic)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(targets), 512):
            hist = histories[start : start + 512]
            answer = torch.tensor(targets[start : start + 512])
            inputs = torch.zeros(len(hist), window, dtype=torch.long)
            for r, h in enumerate(hist):
                h = h[-window:]
                inputs[r, window - len(h):] = torch.tensor(h)
            scores = model(inputs)[0][:, -1, :]
            target_score = scores.gather(1, answer[:, None]).clone()
            scores.scatter_(1, inputs, float("-inf"))
            scores[:, 0] = float("-inf")
            scores.scatter_(1, answer[:, None], target_score)
            out.append(1 + (scores > target_score).sum(1) + (scores == target_score).sum(1) - 1)
    return torch.cat(out).double()


def metrics(r: torch.Tensor) -> dict[str, float]:
    return {"NDCG@10": float(ndcg_per_user(r, 10).mean()), "Recall@10": float((r <= 10).double().mean()), "MRR": float((1 / r).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="a clone of github.com/yueqirex/LRURec")
    ap.add_argument("--dataset", default="amazon-scientific")
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--max-epochs", type=int, default=300)
    args = ap.parse_args()
    sys.path.insert(0, args.official)
    from model.lru import LRU  # the official model

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    seqs = read_sequences(args.dataset)
    users = [u for u in sorted(seqs) if len(seqs[u]) >= 3]
    train = {u: s[:-2] for u, s in seqs.items()}
    n_items = max(i for s in seqs.values() for i in s)
    config = types.SimpleNamespace(num_items=n_items, bert_hidden_units=64, bert_dropout=args.dropout,
                                   bert_attn_dropout=args.dropout, bert_num_blocks=2, dataset_code=args.dataset)
    model = LRU(config)
    inputs, labels = training_windows(train, args.window)
    named = list(model.named_parameters())
    exempt = ("bias", "layer_norm")
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if not any(k in n for k in exempt)], "weight_decay": 0.01},
        {"params": [p for n, p in named if any(k in n for k in exempt)], "weight_decay": 0.0}], lr=1e-3, eps=1e-9)
    loss_fn = nn.CrossEntropyLoss(ignore_index=0)
    val_hist, val_target = [train[u] for u in users], [seqs[u][-2] for u in users]
    test_hist, test_target = [seqs[u][:-1] for u in users], [seqs[u][-1] for u in users]
    best, best_state, waited, epoch, start = -1.0, None, 0, 0, time.perf_counter()
    while waited < args.patience and epoch < args.max_epochs:
        model.train()
        order = torch.randperm(len(inputs))
        for i in range(0, len(order), 128):
            batch = order[i : i + 128]
            logits = model(inputs[batch])[0]
            loss = loss_fn(logits.view(-1, logits.size(-1)), labels[batch].view(-1))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        epoch += 1
        val = metrics(ranks(model, val_hist, val_target, args.window))["NDCG@10"]
        if val > best:
            best, waited, best_state = val, 0, {k: t.clone() for k, t in model.state_dict().items()}
        else:
            waited += 1
        print(f"epoch {epoch}: val NDCG@10 {val:.5f} (best {best:.5f})", file=sys.stderr, flush=True)
    model.load_state_dict(best_state)
    row = {"dataset": args.dataset, "method": "official_lrurec_target_only", "seed": args.seed, "dropout": args.dropout,
           "window": args.window, **metrics(ranks(model, test_hist, test_target, args.window)), "val NDCG@10": best,
           "epochs": epoch, "converged": waited >= args.patience, "train_seconds": round(time.perf_counter() - start, 1),
           "header": header("official LRURec under this project's protocol", f"early stopping, patience {args.patience} epochs")}
    with (experiment_dir("scientific") / "official_lrurec.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
