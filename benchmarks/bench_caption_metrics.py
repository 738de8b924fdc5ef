"""Our caption scoring (`captioning.score_captions`) against `pycocoevalcap` called directly,
on the same captions, side by side in one run: the values (they must be equal) and the time.

The captions are generated "<verb> the <object>" instruction sentences with a share of wrong
objects and verbs, so every metric sits strictly between 0 and its maximum.

    python benchmarks/bench_caption_metrics.py [--segments 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from videobert.captioning import METRIC_NAMES, java_available, score_captions


def captions(segments: int, seed: int = 0) -> tuple[dict[str, list[str]], dict[str, str]]:
    rng = np.random.default_rng(seed)
    verbs = ["slide", "lift", "spin", "cut", "pour", "stir"]
    objects = ["circle", "square", "star", "onion", "bread", "soup", "egg"]
    refs, cands = {}, {}
    for i in range(segments):
        v, o = rng.choice(verbs), rng.choice(objects)
        refs[str(i)] = [f"now let me show you how to {v} the {o}.", f"{v} the {o} slowly"]
        cv = v if rng.random() < 0.7 else rng.choice(verbs)
        co = o if rng.random() < 0.8 else rng.choice(objects)
        cands[str(i)] = (
            f"now let me show you how to {cv} the {co}" if rng.random() < 0.6 else f"{cv} the {co}"
        )
    return refs, cands


def peer(refs: dict[str, list[str]], cands: dict[str, str]) -> dict[str, float]:
    """The COCO caption evaluation as its own code runs it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tokenizer.tokenize({k: [{"caption": cands[k]}] for k in refs})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    return {
        "bleu3": bleu[2],
        "bleu4": bleu[3],
        "meteor": Meteor().compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--segments", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not java_available():
        raise SystemExit("needs java (pycocoevalcap's tokenizer and METEOR)")
    refs, cands = captions(args.segments)
    ours_s, peer_s = [], []
    for _ in range(args.repeats):  # alternating, best of each
        t = time.perf_counter()
        ours = score_captions(refs, cands).metrics
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = peer(refs, cands)
        peer_s.append(time.perf_counter() - t)
    print(f"{args.segments} segments, best of {args.repeats}; load {os.getloadavg()[0]:.1f}")
    print(f"{'metric':<8} {'ours':>10} {'pycocoevalcap':>14} {'ratio':>8}")
    for m in METRIC_NAMES:
        print(f"{m:<8} {ours[m]:>10.6f} {theirs[m]:>14.6f} {ours[m] / theirs[m]:>8.4f}")
    print(f"{'seconds':<8} {min(ours_s):>10.2f} {min(peer_s):>14.2f} {min(ours_s) / min(peer_s):>8.2f}")


if __name__ == "__main__":
    main()
