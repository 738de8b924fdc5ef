"""VideoBERT: the Ray-free library (decode, features, codebook, text, model, training, MLflow)."""

__version__ = "0.1.0"
