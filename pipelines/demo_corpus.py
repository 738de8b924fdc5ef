"""`videobert demo-corpus`: write the demo corpus (videos, narrations, labels) under `source`.

    videobert demo-corpus --config configs/demo.yaml [--videos-per-class 3] [--seed 0]

No Ray needed: a few dozen tiny videos take seconds in one process. The labels go to
`evaluate.labels` when set, else to `<source>/labels.csv`.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.common import stage_main
from videobert.config import ExperimentConfig
from videobert.demo_corpus import CorpusSummary, DemoSpec, generate_corpus


def run(config: ExperimentConfig, spec: DemoSpec | None = None) -> CorpusSummary:
    summary = generate_corpus(config.source, spec or DemoSpec(), config.evaluate.labels, config.s3)
    for note in summary.notes:
        print(f"note: {note}")
    print(
        f"demo corpus: {summary.videos} videos with transcripts and {summary.samples} sample videos "
        f"under {summary.source} ({summary.written} files written, {summary.unchanged} unchanged); "
        f"labels: {summary.labels_uri}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    defaults = DemoSpec()
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--videos-per-class", type=int, default=defaults.videos_per_class)
    parser.add_argument("--objects", type=int, default=defaults.objects)
    parser.add_argument("--actions", type=int, default=defaults.actions)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    options, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        print(
            "demo options: --videos-per-class N, --objects K, --actions M, --seed S "
            f"(defaults {defaults.videos_per_class}, {defaults.objects}, {defaults.actions}, {defaults.seed})"
        )
    try:
        spec = DemoSpec(
            objects=options.objects,
            actions=options.actions,
            videos_per_class=options.videos_per_class,
            seed=options.seed,
        )
    except ValueError as error:
        print(f"videobert demo-corpus: {error}", file=sys.stderr)
        return 2
    return stage_main("demo-corpus", lambda config: run(config, spec), rest)


if __name__ == "__main__":
    sys.exit(main())
