"""Gaussian-mixture theory of paper section 7: closed forms (:mod:`.gmm`), simulation
(:mod:`.simulate`), the lab that compares them (:mod:`.lab`, :func:`run_gmm_lab`) and its
figures (:mod:`.figures`). numpy / float64; torch only for the SGD fit."""

from condnoise.theory.lab import GMMLabConfig, LabResult, run_gmm_lab

__all__ = ["GMMLabConfig", "LabResult", "run_gmm_lab"]
