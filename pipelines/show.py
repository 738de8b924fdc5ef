"""`videobert show`: the fine-tuned champions' predictions for a few held-out videos, next to
the truth (videobert/showcase.py); the last step of `./scripts/demo.sh`.

    videobert show --config configs/demo.yaml [--set demo.show_videos=8]

No Ray: a handful of videos run through the registered models' `predict` in this process,
as a user pulling them from the registry would run them.
"""

from __future__ import annotations

import sys

from pipelines.common import stage_main
from videobert.config import ExperimentConfig
from videobert.showcase import ShownVideo, format_shown, held_out_videos, predict_shown


def run(config: ExperimentConfig) -> list[ShownVideo]:
    from videobert.tracking import tracking_uri, use_tracking_uri

    use_tracking_uri(tracking_uri(config))
    shown = predict_shown(config, held_out_videos(config, config.demo.show_videos))
    print(f"\nheld-out videos, predicted next to the truth ({len(shown)}):")
    print(format_shown(shown))
    return shown


def main(argv: list[str] | None = None) -> int:
    return stage_main("show", run, argv, lease=False)  # reads only


if __name__ == "__main__":
    sys.exit(main())
