"""Ray entrypoints: one thin module per stage (`python -m pipelines.<stage>`)."""
