"""DRDFL-CFL (paper 001, Algorithm 3): DRDFL on the star. The hub averages the nodes'
Learngenes and class statistics weighted by |D_m| (their training examples); every node
sets its Learngene and its class statistics to the average (Algorithm 3, line 4), where
the ring's DRDFL pulls its statistics toward the received ones by EMA (Algorithm 1).
Everything else, private modules included, is DRDFL's, from the same ``[drdfl]`` config
section.
"""

from __future__ import annotations

from drdfl_flwr.methods.drdfl import DRDFLLearner
from drdfl_flwr.spec import MethodSpec
from strategies.reducers import weighted_mean

SPEC = MethodSpec(
    name="drdfl-cfl",
    title="DRDFL-CFL",
    sends="Learngene + class statistics (hub: mean weighted by training examples)",
    keeps="PersonaNet, decoder, classifier",
    personalized="PersonaNet + decoder + classifier",
    learner=DRDFLLearner,
    reducer=weighted_mean,
)
