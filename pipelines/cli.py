"""`videobert <stage> [--config FILE] [--set key=value ...]`: one command for every stage."""

from __future__ import annotations

import importlib
import sys

# stage name on the command line -> module under pipelines/
STAGES = {
    "extract": "extract",
    "fit-codebook": "fit_codebook",
    "tokenize": "tokenize",
    "pretrain": "pretrain",
    "evaluate": "evaluate",
    "promote": "promote",
    "embed": "embed",
    "finetune-classify": "finetune_classify",
    "finetune-caption": "finetune_caption",
    "run": "run",
    "demo-corpus": "demo_corpus",
    "show": "show",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"videobert: unknown stage {argv[0]!r}", file=sys.stderr)
        print("usage: videobert <stage> [--config FILE] [--set key=value ...]", file=sys.stderr)
        print("stages: " + ", ".join(STAGES), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"pipelines.{STAGES[argv[0]]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
