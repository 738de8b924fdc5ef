"""Issue 13's goals on a second corpus that nothing was tuned on: other objects, motions, wording.

Generates a corpus of the demo's kind with other object names and colours, two motions the
demo does not use (plus one it does), other narration phrasings and other fillers; then runs
`videobert run` on it with configs/demo.yaml's settings unchanged and prints the champion's
held-out metrics next to the goals. Nothing here is used to choose settings.

    python benchmarks/second_corpus.py --root /tmp/videobert-corpus2 [--seed 0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from videobert import demo_corpus
from videobert.config import load_config
from videobert.demo_corpus import Cue, DemoSpec, DemoVideo

REPO = Path(__file__).resolve().parent.parent
# name -> (shape drawn, colour): names and colours the demo never shows
OBJECTS = {
    "lemon": ("circle", (235, 215, 40)),
    "brick": ("square", (150, 60, 30)),
    "kite": ("diamond", (40, 150, 225)),
    "leaf": ("star", (40, 140, 60)),
}
ACTIONS = {"shrink": "gets smaller", "bounce": "bounces on the floor", "spin": "rotates in place"}
PHRASINGS = (
    "watch me {verb} the {object} now.",
    "here i {verb} the {object} slowly.",
    "next we {verb} the {object}.",
)
OPENERS = ("good morning.", "welcome back.", "right then.")
CLOSERS = ("and we are done.", "simple enough.", "see you next time.")


def narration(video: DemoVideo, spec: DemoSpec) -> list[Cue]:
    """The demo's layout (one instruction, one filler) in other words."""
    rng = np.random.default_rng(video.seed + 2)
    filler = round(spec.seconds * float(rng.choice([0.125, 0.1875, 0.25])), 3)
    instruction = str(rng.choice(PHRASINGS)).format(verb=video.verb, object=video.object)
    if rng.random() < 0.5:
        return [Cue(0.0, filler, str(rng.choice(OPENERS))), Cue(filler, spec.seconds, instruction)]
    closer_start = round(spec.seconds - filler, 3)
    return [Cue(0.0, closer_start, instruction), Cue(closer_start, spec.seconds, str(rng.choice(CLOSERS)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="/tmp/videobert-corpus2")
    parser.add_argument("--seed", type=int, default=0, help="training seed (train.seed)")
    args = parser.parse_args()
    root = Path(args.root)
    demo_corpus.OBJECTS, demo_corpus.ACTIONS = OBJECTS, ACTIONS
    demo_corpus.narration = narration
    labels = root / "labels.csv"
    # The demo's corpus size (videos a class), its own videos (seed 11).
    demo = load_config(REPO / "configs/demo.yaml").demo
    spec = DemoSpec(
        objects=demo.objects, actions=demo.actions, videos_per_class=demo.videos_per_class, seed=11
    )
    demo_corpus.generate_corpus(str(root / "videos"), spec, labels_uri=str(labels))
    overrides = [f"source={root / 'videos'}", f"output={root / 'out'}", f"evaluate.labels={labels}"]
    # Pretraining and evaluation only: the fine-tuning tables are the demo corpus's.
    overrides += [f"train.seed={args.seed}", "finetune.labels=null", "finetune.captions=null"]
    command = [sys.executable, "-m", "pipelines.run", "--config", str(REPO / "configs/demo.yaml")]
    subprocess.run([*command, *(f"--set={o}" for o in overrides)], check=True, cwd=REPO)

    from mlflow import MlflowClient

    from videobert.registry import CHAMPION, alias_version
    from videobert.tracking import tracking_uri, use_tracking_uri

    config = load_config(REPO / "configs/demo.yaml", overrides)
    use_tracking_uri(tracking_uri(config))
    client = MlflowClient()
    version = alias_version(client, config.mlflow.registered_model, CHAMPION)
    tags = client.get_model_version(config.mlflow.registered_model, version).tags
    value = {
        k.removeprefix("eval."): float(v)
        for k, v in tags.items()
        if k.startswith("eval.") and k != "eval.run_id"
    }
    rows = [
        (
            "zero-shot object top-1",
            "zero_shot_object_top1",
            f">= 3x chance {3 * value['zero_shot_object_chance']:.2f}",
        ),
        (
            "zero-shot verb top-1",
            "zero_shot_verb_top1",
            f">= 2x chance {2 * value['zero_shot_verb_chance']:.2f}",
        ),
        ("alignment AUC (named texts)", "alignment_auc_named", ">= 0.90"),
        ("alignment AUC (all texts)", "alignment_auc", "-"),
        (
            "text->video R@1 (named texts)",
            "retrieval_recall_at_1_named",
            f">= 5x chance {5 * value['retrieval_chance_recall_at_1_named']:.3f}",
        ),
        (
            "median rank (named texts)",
            "retrieval_median_rank_named",
            f"<= {value['retrieval_candidates_named'] / 5:.1f} (1/5 of candidates)",
        ),
    ]
    print(f"second corpus, champion v{version}, train.seed={args.seed}")
    print("| metric | value | goal |\n|---|---|---|")
    for label, key, goal in rows:
        print(f"| {label} | {value[key]:.3f} | {goal} |")


if __name__ == "__main__":
    main()
