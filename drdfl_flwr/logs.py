"""Flower's logger, by name: the node side (data, learners) logs where Flower's own lines
go without importing Flower, which only the app layer does."""

from __future__ import annotations

import logging

log = logging.getLogger("flwr").log
