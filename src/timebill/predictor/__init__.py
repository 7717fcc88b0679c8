"""Response-length predictors (the paper's RLP and baselines), their training data and labels.

| predictor | module | reads | paper |
|---|---|---|---|
| RLP (buckets / regression) | ``rlp`` | frozen decoder LM, head+tail truncated prompt | TimeBill |
| probe | ``probe`` | the target's own last prompt-token state from its prefill | ours |
| ProxyModel-, S³-style | ``baselines`` | MiniLM-L6 sentence embedding | Qiu 2024; Jin 2023 |
| constant (stand-in) | ``constant`` | nothing: the same N̂ for every prompt | — |

The trained ones return a :class:`~timebill.predictor.base.LengthPrediction` (``point``, ``probs``, ``upper(δ)``).
Heavy modules (torch, transformers) are imported only when a predictor is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from timebill.predictor.constant import (
    ConstantLengthPredictor,
    ConstantPrediction,
    constant_length_predictor,
    parse_constant_spec,
)

__all__ = [
    "DATA_DIR",
    "DEFAULT_PREDICTOR_FILE",
    "DEFAULT_PROBE_FILE",
    "DEFAULT_RLP_FILE",
    "ConstantLengthPredictor",
    "ConstantPrediction",
    "constant_length_predictor",
    "load_default_predictor",
    "load_predictor",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_RLP_FILE = DATA_DIR / "predictor-smollm2-135m.pt"
DEFAULT_PROBE_FILE = DATA_DIR / "probe-smollm2-135m.pt"
# What TimeBill loads when no predictor is named: the probe. It reads the hidden state the target's own
# prefill computes anyway (1.7 ms after prefill vs 524 ms for the RLP's separate forward on a 2k-token
# prompt, which on 2 cores competes with the prefill) and scored the lower test MAE
# (docs/results/rlp_table.md, docs/results/planner_overhead.txt).
DEFAULT_PREDICTOR_FILE = DEFAULT_PROBE_FILE


def load_predictor(path: str | os.PathLike[str], engine: object, target_engine: object | None = None) -> object:
    """Load any saved predictor file (RLP, probe or baseline) for ``engine`` (its backbone/target).

    Raises :class:`~timebill.errors.PredictorError` when the file is missing, corrupt, or was trained
    for another model.
    """
    from timebill.predictor.base import load_payload

    kind = load_payload(path).get("kind")
    if kind == "rlp":
        from timebill.predictor.rlp import RLPredictor

        return RLPredictor.load(path, engine, target_engine)
    if kind == "probe":
        from timebill.predictor.probe import ProbePredictor

        return ProbePredictor.load(path, engine, target_engine)
    from timebill.predictor.baselines import EncoderBaselinePredictor

    return EncoderBaselinePredictor.load(path)


def load_default_predictor(engine: object, path: str | os.PathLike[str] | None = None) -> object:
    """The predictor TimeBill uses: ``path`` if given, else the one shipped for the default model.

    ``path`` may also be ``"rlp"`` or ``"probe"`` to pick one of the shipped files, or ``"constant:N"``
    for the stand-in that predicts N tokens for every prompt (the only choice for a model nothing was
    trained for until its predictor is, so that its budgets can be planned at all).
    """
    from timebill.errors import PredictorError
    from timebill.loading import DEFAULT_MODEL_ID

    length = parse_constant_spec(str(path)) if path is not None else None
    if length is not None:
        return constant_length_predictor(length)
    shipped = {"rlp": DEFAULT_RLP_FILE, "probe": DEFAULT_PROBE_FILE}
    if path is not None and str(path) not in shipped:
        return load_predictor(path, engine)
    model_id = getattr(getattr(engine, "source", None), "model_id", None)
    if model_id != DEFAULT_MODEL_ID:
        raise PredictorError(
            f"No length predictor ships for {model_id!r} (only for {DEFAULT_MODEL_ID}). Pass "
            "`--predictor constant:N` to plan with the stand-in N̂ = N tokens for every prompt (worst case k·N), "
            "or label and train one: `timebill rlp label --model M --out L.jsonl` then "
            "`timebill rlp train --model M --labels L.jsonl --out P.pt`, and pass that file."
        )
    return load_predictor(shipped.get(str(path), DEFAULT_PREDICTOR_FILE), engine)
