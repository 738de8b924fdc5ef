"""`videobert demo-corpus`: write the demo corpus (videos, narrations, labels) under `source`.

    videobert demo-corpus --config configs/demo.yaml [--set demo.videos_per_class=3 --set demo.seed=1]

What to generate comes from the `demo:` section of the config, like every stage's settings.
No Ray needed: a few dozen tiny videos take seconds in one process. The labels go to
`evaluate.labels` when set, else to `<source>/labels.csv`; the classification table (every
video's "<verb> the <object>", split test for the labelled ones) to `finetune.labels` when set;
the captions table (every video's instruction sentence and its span) to `finetune.captions`.
"""

from __future__ import annotations

import sys

from pipelines.common import stage_main
from videobert.config import DemoConfig, ExperimentConfig
from videobert.demo_corpus import CorpusSummary, DemoSpec, generate_corpus


def demo_spec(demo: DemoConfig) -> DemoSpec:
    """The corpus the `demo:` section asks for; frame size, fps and length keep DemoSpec's defaults."""
    return DemoSpec(
        objects=demo.objects,
        actions=demo.actions,
        videos_per_class=demo.videos_per_class,
        seed=demo.seed,
    )


def run(config: ExperimentConfig) -> CorpusSummary:
    summary = generate_corpus(
        config.source,
        demo_spec(config.demo),
        config.evaluate.labels,
        config.s3,
        config.finetune.labels,
        config.finetune.captions,
    )
    for note in summary.notes:
        print(f"note: {note}")
    print(
        f"demo corpus: {summary.videos} videos with transcripts and {summary.samples} sample videos "
        f"under {summary.source} ({summary.written} files written, {summary.unchanged} unchanged); "
        f"labels: {summary.labels_uri}"
        + (f"; classes: {config.finetune.labels}" if config.finetune.labels else "")
        + (f"; captions: {config.finetune.captions}" if config.finetune.captions else "")
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("demo-corpus", run, argv, lease=False)  # it writes under `source`


if __name__ == "__main__":
    sys.exit(main())
