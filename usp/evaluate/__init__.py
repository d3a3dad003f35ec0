"""Evaluation: Inception features and ADM's FID / sFID / IS / precision / recall, ADM-format NPZ batches, a
domain classifier for small data (its "domain FD" is not comparable to Inception FID), quick frozen-feature
probes (logistic regression, k-NN) and the restoration figure of a pretraining run.

May import: config, run (the weights and log readers), data, models, diffusion (the objective's noising, for
the backbone probe), latent; never sample, train, demo or cli.
"""

from usp.evaluate.domain import DomainEvaluator, domain_metrics, train_domain_classifier, train_domain_cnn
from usp.evaluate.inception import InceptionFeatures, InceptionOutputs, resolve_weights, save_random_weights
from usp.evaluate.metrics import (
    compute_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from usp.evaluate.reference import (
    evaluate_command,
    evaluate_npz,
    format_metrics_table,
    inception_stats,
    iter_npz_batches,
    read_npz_labels,
    read_npz_stats,
    reference_batch_from_folder,
    write_metrics_json,
    write_reference_npz,
    write_sample_npz,
)

__all__ = [
    "DomainEvaluator",
    "InceptionFeatures",
    "InceptionOutputs",
    "compute_statistics",
    "domain_metrics",
    "evaluate_command",
    "evaluate_npz",
    "format_metrics_table",
    "frechet_distance",
    "inception_score",
    "inception_stats",
    "iter_npz_batches",
    "manifold_radii",
    "precision_recall",
    "read_npz_labels",
    "read_npz_stats",
    "reference_batch_from_folder",
    "resolve_weights",
    "save_random_weights",
    "train_domain_classifier",
    "train_domain_cnn",
    "write_metrics_json",
    "write_reference_npz",
    "write_sample_npz",
]
