"""RLP training choice, measured: frozen backbone + trained head vs fine-tuning the backbone's top layers.

Issue #5 leaves the choice open ("frozen backbone with cached pooled features + trained head, or LoRA
on the top layers — measure and choose"). This script measures it on the same data and split as
``benchmarks/rlp_table.py``:

- **frozen**: the backbone (SmolLM2-135M, the target itself) is not trained; the head reads the last
  token and the mean of the final-norm output on the N_p-token head+tail input, plus log(prompt
  tokens) (the ablation's "last+mean, final norm, + length" input). Trained with
  :func:`timebill.predictor.heads.train_head`, exactly as ``timebill rlp train`` trains heads.
- **top-k fine-tuned**: the same head input, but the top ``k`` decoder layers and the final norm are
  trained together with the head (full fine-tuning of those layers — at 4.4M parameters a layer,
  cheaper and simpler than LoRA adapters, and a superset of what LoRA on them can express). The head
  starts from the frozen run's head, so fine-tuning starts where the frozen choice ends; early
  stopping on the same held-out 10 % slice of the training split.

How it stays practical on 2 cores: the input of layer ``L - max(k)`` for every prompt is computed
once (one forward of the lower layers, cached as float16 chunks under the cache dir, resumable), so
an epoch only runs the top ``k`` layers forward and backward.

    python benchmarks/rlp_finetune.py --threads 2 --ks 1,2,4

Prints a table (test split MAE / RMSE / R² of the argmax bucket point, B = 16, and the wall time each
choice took) and writes it to ``docs/results/rlp_finetune.md``. One run, numbers as measured.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from timebill.cpulock import holding
from timebill.engine import Engine
from timebill.paths import cache_dir, write_bytes_atomically
from timebill.predictor.buckets import BucketSpec
from timebill.predictor.experiment import SPLITS, Evaluation, LabelledData
from timebill.predictor.features import FeatureStore, truncate_head_tail
from timebill.predictor.heads import Head, HeadConfig, train_head
from timebill.predictor.rlp import points_from_probs
from timebill.progress import progress_bar

ROOT = Path(__file__).resolve().parent.parent
OUT_MD = ROOT / "docs" / "results" / "rlp_finetune.md"


def decoder_of(engine: Engine) -> nn.Module:
    return engine.model.model


def run_layers(decoder: nn.Module, hidden: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
    """Causal forward of ``hidden`` (1, seq, d) through ``layers`` (no padding: batch of one)."""
    positions = torch.arange(hidden.shape[1])[None]
    rope = decoder.rotary_emb(hidden, positions)
    for layer in layers:
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def pooled(norm: nn.Module, hidden: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """Head input: last token and mean of the final-norm output, and log(1 + full prompt tokens)."""
    h = norm(hidden)[0]
    return torch.cat([h[-1], h.mean(0), torch.tensor([math.log1p(prompt_tokens)], dtype=h.dtype)])


def cache_states(engine: Engine, data: LabelledData, split_layer: int, n_p: int, lock: str | None) -> FeatureStore:
    """Input of layer ``split_layer`` for every labelled prompt's N_p-token input (float16, padded to N_p)."""
    src = engine.source
    where = cache_dir() / "features" / f"{src.model_id}-{src.fingerprint}"
    store = FeatureStore(where / f"states-np{n_p}-L{split_layer}")
    done = store.done()
    todo = [(i, p) for i, p in data.items() if i not in done]
    decoder = decoder_of(engine)
    lower = list(decoder.layers[:split_layer])
    with progress_bar(len(todo), "prompt", f"layer-{split_layer} states") as bar:
        for start in range(0, len(todo), 32):
            part = todo[start : start + 32]
            states = np.zeros((len(part), n_p, decoder.config.hidden_size), dtype=np.float16)
            n_tok, prompt_tokens = [], []
            with holding(lock), torch.inference_mode():
                for row, (_, prompt) in enumerate(part):
                    ids = engine.encode(prompt)
                    short = truncate_head_tail(ids, n_p)
                    hidden = run_layers(decoder, decoder.embed_tokens(torch.tensor([short])), lower)
                    states[row, : len(short)] = hidden[0].numpy().astype(np.float16)
                    n_tok.append(len(short))
                    prompt_tokens.append(len(ids))
            store.write(
                {
                    "index": np.array([i for i, _ in part], dtype=np.int64),
                    "states": states,
                    "n_tok": np.array(n_tok, dtype=np.int64),
                    "prompt_tokens": np.array(prompt_tokens, dtype=np.int64),
                }
            )
            bar.update(len(part))
    return store


def check_against_model(engine: Engine, prompt: str, n_p: int) -> float:
    """Max |difference| between our layer-by-layer forward and the model's own final hidden state."""
    decoder = decoder_of(engine)
    ids = truncate_head_tail(engine.encode(prompt), n_p)
    with torch.inference_mode():
        ours = decoder.norm(run_layers(decoder, decoder.embed_tokens(torch.tensor([ids])), list(decoder.layers)))
        ref = decoder(input_ids=torch.tensor([ids])).last_hidden_state
    return float((ours - ref).abs().max())


class TopModel(nn.Module):
    """Top ``k`` decoder layers + final norm (copies, trainable) + a head over the pooled state."""

    def __init__(self, decoder: nn.Module, k: int, head: Head) -> None:
        super().__init__()
        self.rotary = decoder.rotary_emb
        self.layers = nn.ModuleList(copy.deepcopy(list(decoder.layers[len(decoder.layers) - k :])))
        self.norm = copy.deepcopy(decoder.norm)
        self.head = head
        self.decoder = [decoder]  # not a submodule: only the rotary embedding is used from it

    def forward(self, hidden: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
        out = run_layers(self.decoder[0], hidden, list(self.layers))
        return self.head(pooled(self.norm, out, prompt_tokens)[None])


def frozen_inputs(engine: Engine, rows: dict, split_layer: int, k: int) -> tuple[dict, dict]:
    """Per split: layer-(L-k) inputs (list of tensors) and pooled frozen head inputs (array)."""
    decoder = decoder_of(engine)
    n_layers = len(decoder.layers)
    middle = list(decoder.layers[split_layer : n_layers - k])
    top = list(decoder.layers[n_layers - k :])
    inputs, pooled_x = {}, {}
    with torch.inference_mode():
        for split in SPLITS:
            r = rows[split]
            inputs[split], xs = [], []
            for states, n, pt in zip(r["states"], r["n_tok"], r["prompt_tokens"], strict=True):
                h = torch.from_numpy(states[:n].astype(np.float32))[None]
                h = run_layers(decoder, h, middle)
                inputs[split].append(h.clone())
                xs.append(pooled(decoder.norm, run_layers(decoder, h, top), int(pt)).numpy())
            pooled_x[split] = np.stack(xs)
    return inputs, pooled_x


def split_metrics(logits: np.ndarray, spec: BucketSpec, true: np.ndarray) -> Evaluation:
    """MAE / RMSE / R² of the argmax-bucket points, computed as ``rlp_table.py`` computes them."""
    return Evaluation("", true, points_from_probs(logits, spec.upper_edges()), [])


def finetune(
    engine: Engine,
    inputs: dict,
    rows: dict,
    y: dict,
    head: Head,
    k: int,
    epochs: int,
    lr_layers: float,
    lr_head: float,
    accumulate: int,
    lock: str | None,
) -> tuple[TopModel, dict]:
    """Train the top ``k`` layers + norm + head (warm-started head) for ``epochs`` epochs.

    Returns the model at its best *fine-tuned* epoch (≥ 1) by the held-out slice's loss, and the
    held-out losses per epoch, epoch 0 being the warm start (= the frozen choice), so the report can
    say whether fine-tuning ever beat not fine-tuning.
    """
    model = TopModel(decoder_of(engine), k, copy.deepcopy(head))
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("head.")], "lr": lr_layers},
        {"params": list(model.head.parameters()), "lr": lr_head},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    n = len(inputs["train"])
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen).numpy()  # the same held-out slice as train_head's
    n_val = max(1, int(round(n * 0.1)))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    pts = rows["train"]["prompt_tokens"]

    def loss_of(i: int) -> torch.Tensor:
        return loss_fn(model(inputs["train"][i], int(pts[i])), torch.tensor([y["train"][i]]))

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(np.mean([float(loss_of(i)) for i in val_idx]))

    losses = [val_loss()]
    best: tuple[float, int, dict] | None = None
    for epoch in range(1, epochs + 1):
        model.train()
        perm = fit_idx[torch.randperm(len(fit_idx), generator=gen).numpy()]
        opt.zero_grad()
        with holding(lock):
            for step, i in enumerate(perm, 1):
                (loss_of(i) / accumulate).backward()
                if step % accumulate == 0 or step == len(perm):
                    opt.step()
                    opt.zero_grad()
        losses.append(val_loss())
        print(f"  k={k} lr={lr_layers:g} epoch {epoch}: held-out loss {losses[-1]:.4f} (start {losses[0]:.4f})")
        if best is None or losses[-1] < best[0]:
            best = (losses[-1], epoch, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    return model, {"val_loss": losses, "best_epoch": best[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", default="1,2,4", help="top-layer counts to fine-tune")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr-layers", default="3e-5,1e-5", help="learning rates of the layers to try")
    parser.add_argument("--lr-head", type=float, default=1e-4)
    parser.add_argument("--accumulate", type=int, default=16, help="prompts per optimiser step")
    parser.add_argument("--n-prompt-tokens", type=int, default=512)
    parser.add_argument("--labels", default=None)
    parser.add_argument("--cpu-lock", default=None)
    parser.add_argument("--out", default=str(OUT_MD))
    parser.add_argument("--limit", type=int, default=0, help="smoke test: first N prompts of each split only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ks = sorted({int(k) for k in args.ks.split(",")})
    lrs = [float(v) for v in args.lr_layers.split(",")]

    engine = Engine.load(None, threads=args.threads, warmup=False)
    data = LabelledData.load(args.labels, engine)
    if args.limit:
        for s in SPLITS:
            data.conversations[s] = data.conversations[s][: args.limit]
            data.lengths[s] = data.lengths[s][: args.limit]
    counts = data.counts()
    print(f"labelled prompts: {counts} (protocol {data.protocol})", flush=True)
    drift = check_against_model(engine, data.conversations["test"][0].prompt, args.n_prompt_tokens)
    print(f"layer-by-layer forward vs the model's: max |diff| {drift:.2e}", flush=True)
    if drift > 1e-3:
        raise SystemExit("our layer-by-layer forward does not reproduce the model; refusing to measure")

    n_layers = len(decoder_of(engine).layers)
    split_layer = n_layers - max(ks)
    t0 = time.perf_counter()
    store = cache_states(engine, data, split_layer, args.n_prompt_tokens, args.cpu_lock)
    cached = store.load()
    position = {int(i): r for r, i in enumerate(cached["index"])}
    rows = {
        s: {key: cached[key][[position[i] for i in data.indices(s)]] for key in ("states", "n_tok", "prompt_tokens")}
        for s in SPLITS
    }
    del cached
    t_cache = time.perf_counter() - t0
    spec = BucketSpec(16, data.cap_tokens)
    y = {s: spec.labels(data.lengths[s]) for s in SPLITS}
    true = data.lengths["test"].astype(np.float64)

    results = []
    for k in ks:
        t0 = time.perf_counter()
        inputs, x = frozen_inputs(engine, rows, split_layer, k)
        t_pre = time.perf_counter() - t0
        config = HeadConfig(in_dim=x["train"].shape[1], n_out=spec.num_classes)
        t0 = time.perf_counter()
        head, _ = train_head(x["train"], y["train"], config, threads=args.threads)
        t_head = time.perf_counter() - t0
        if k == ks[0]:  # the frozen choice does not depend on k: its features are the same
            frozen = split_metrics(head.infer(x["test"]), spec, true)
            results.append(("frozen backbone, trained head (shipped choice)", frozen, t_head, "", ""))
            print(f"frozen: MAE {frozen.mae:.1f} head training {t_head:.1f} s", flush=True)
        for lr in lrs:
            t0 = time.perf_counter()
            model, hist = finetune(
                engine, inputs, rows, y, head, k, args.epochs, lr, args.lr_head, args.accumulate, args.cpu_lock
            )
            t_ft = time.perf_counter() - t0
            with torch.no_grad():
                pairs = zip(inputs["test"], rows["test"]["prompt_tokens"], strict=True)
                logits = np.stack([model(h, int(pt))[0].numpy() for h, pt in pairs])
            m = split_metrics(logits, spec, true)
            losses = " → ".join(f"{v:.3f}" for v in hist["val_loss"])
            name = f"top {k} layer(s) + norm + head fine-tuned, layers lr {lr:g}"
            results.append((name, m, t_pre + t_head + t_ft, losses, hist["best_epoch"]))
            print(f"top-{k} lr {lr:g}: MAE {m.mae:.1f} ({t_ft:.0f} s, held-out {losses})", flush=True)
            del model

    lines = [
        "# RLP training choice: frozen backbone vs fine-tuned top layers",
        "",
        f"Generated by `python benchmarks/rlp_finetune.py --threads {args.threads} --ks {args.ks} "
        f"--lr-layers {args.lr_layers} --epochs {args.epochs}` (one run, {time.strftime('%Y-%m-%d')}). "
        "Backbone: SmolLM2-135M-Instruct "
        f"(the target), input N_p = {args.n_prompt_tokens} tokens (head+tail), head input = last token + mean of "
        "the final norm + log(prompt tokens), B = 16, point = argmax bucket. Same fixed splits as "
        f"`rlp_table.py`: train {counts['train']}, calibration {counts['calibration']}, test {counts['test']}.",
        "",
        f"Layer-{split_layer} input states cached once for all prompts: {t_cache / 60:.1f} min "
        f"(resumable; {args.threads} threads). Fine-tuning: AdamW, head lr {args.lr_head:g} (warm-started from "
        f"the frozen head), {args.accumulate} prompts per step, {args.epochs} epochs; the test row is the "
        "fine-tuned epoch with the lowest loss on the held-out 10 % slice of train. Held-out loss column: "
        "epoch 0 (the warm start, i.e. the frozen choice) → each fine-tuned epoch.",
        "",
        "| choice | test MAE | RMSE | R² | training time (s) | held-out loss by epoch | epoch used |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m, t, losses, best in results:
        lines.append(f"| {name} | {m.mae:.1f} | {m.rmse:.1f} | {m.r2:.3f} | {t:.0f} | {losses} | {best} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_bytes_atomically(Path(args.out), text.encode())


if __name__ == "__main__":
    main()
