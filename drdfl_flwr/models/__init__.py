"""Networks: the classifiers every method shares, and DRDFL's encoders and decoder."""

from drdfl_flwr.models.classifiers import build_classifier

__all__ = ["build_classifier"]
