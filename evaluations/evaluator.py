"""ADM's evaluator: FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

Usage (as the reference): ``python evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz``.

This is the algorithm of openai/guided-diffusion's ``evaluations/evaluator.py`` (same Inception graph, tensors,
batch sizes and manifold estimator), brought to current TensorFlow 2.x (``tensorflow.compat.v1``) and NumPy. It is
standalone: it needs only ``evaluations/requirements.txt`` (no Jittor, no guided_diffusion).

The Inception graph ``classify_image_graph_def.pb`` (about 100 MB) is looked for at ``--inception_path``, else at
``$ADM_INCEPTION_PATH``, else at ``./classify_image_graph_def.pb`` (the reference's place: the current working
directory), and downloaded there from ``INCEPTION_V3_URL`` when absent.
"""

import argparse
import io
import os
import random
import sys
import warnings
import zipfile
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing import cpu_count
from multiprocessing.pool import ThreadPool
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # hide TensorFlow's INFO lines; warnings and errors still show

import numpy as np
import requests
from scipy import linalg
from tqdm.auto import tqdm

try:
    import tensorflow.compat.v1 as tf
except ImportError as _tf_error:  # reported by main() as a one-line error naming the fix
    tf = None
    _TF_IMPORT_ERROR: Optional[ImportError] = _tf_error
else:
    _TF_IMPORT_ERROR = None

INCEPTION_V3_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
INCEPTION_V3_PATH = "classify_image_graph_def.pb"
INCEPTION_PATH_ENV = "ADM_INCEPTION_PATH"  # a local copy of classify_image_graph_def.pb (or where to download it)
INCEPTION_URL_ENV = "ADM_INCEPTION_URL"  # where to download it from (a mirror); defaults to INCEPTION_V3_URL

FID_POOL_NAME = "pool_3:0"
FID_SPATIAL_NAME = "mixed_6/conv:0"

STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class EvaluatorError(Exception):
    """A problem the user can fix (missing or malformed file, no network); main() prints it without a traceback."""


class DownloadError(EvaluatorError):
    """The Inception graph is absent and could not be downloaded."""


class NpzFormatError(EvaluatorError, ValueError):
    """An .npz batch lacks arr_0 (or the statistics keys) or does not hold NHWC RGB images."""


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one EvaluatorError naming every problem found in a command's inputs (nothing when there is none)."""
    if len(problems) == 1:
        raise EvaluatorError(problems[0])
    if problems:
        raise EvaluatorError("%d problems with this command:\n" % len(problems)
                             + "\n".join("  %d. %s" % (i + 1, p) for i, p in enumerate(problems)))


def create_argparser() -> argparse.ArgumentParser:
    """The evaluator's command line: the reference's two positional batches plus where the Inception graph lives."""
    parser = argparse.ArgumentParser(
        description="Compute Inception Score, FID, sFID, precision and recall of SAMPLE_BATCH against REF_BATCH "
        "exactly as guided-diffusion's evaluator does.",
    )
    parser.add_argument(
        "ref_batch",
        help="path to reference batch npz file (arr_0: uint8 NHWC images; mu/sigma/mu_s/sigma_s: precomputed "
        "statistics, used when present), e.g. VIRTUAL_imagenet256_labeled.npz",
    )
    parser.add_argument(
        "sample_batch", help="path to sample batch npz file (arr_0: uint8 NHWC images, e.g. 50000 samples)"
    )
    parser.add_argument(
        "--inception_path",
        default=None,
        help=f"path of classify_image_graph_def.pb; downloaded there when absent (default: ${INCEPTION_PATH_ENV} "
        f"if set, else ./{INCEPTION_V3_PATH} in the current working directory). Download URL: {INCEPTION_V3_URL} "
        f"(override with ${INCEPTION_URL_ENV})",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Evaluate SAMPLE_BATCH against REF_BATCH and print the reference's five score lines."""
    args = create_argparser().parse_args(argv)
    _require_tensorflow()

    # Check both batches before downloading 100 MB or spending minutes on the reference batch.
    problems, infos = [], []
    for path in (args.ref_batch, args.sample_batch):
        try:
            infos.append(describe_npz(path))
        except EvaluatorError as exc:
            problems.append(str(exc))
    raise_problems(problems)
    ref_info, sample_info = infos
    _check_enough_for_prec_recall(ref_info, sample_info)
    inception_path = _download_inception_model(resolve_inception_path(args.inception_path))

    config = tf.ConfigProto(
        allow_soft_placement=True  # allows DecodeJpeg to run on CPU in Inception graph
    )
    config.gpu_options.allow_growth = True
    session = tf.Session(graph=tf.Graph(), config=config)
    try:
        evaluator = Evaluator(session, inception_path=inception_path)
        _evaluate(evaluator, args, ref_info, sample_info)
    finally:
        session.close()


def _evaluate(evaluator: "Evaluator", args: argparse.Namespace, ref_info: "NpzInfo", sample_info: "NpzInfo") -> None:
    """The reference's main() body: activations, statistics, then the five score lines."""
    print("warming up TensorFlow...")
    evaluator.warmup()

    print("computing reference batch activations...")
    ref_acts = evaluator.read_activations(args.ref_batch)
    print("computing/reading reference batch statistics...")
    ref_stats, ref_stats_spatial = evaluator.read_statistics(args.ref_batch, ref_acts)

    print("computing sample batch activations...")
    sample_acts = evaluator.read_activations(args.sample_batch)
    print("computing/reading sample batch statistics...")
    sample_stats, sample_stats_spatial = evaluator.read_statistics(args.sample_batch, sample_acts)

    print(f"read: reference batch {ref_info.summary()}; sample batch {sample_info.summary()}")
    for note in comparison_notes(ref_info, sample_info):
        print(f"note: {note}", file=sys.stderr)

    print("Computing evaluations...")
    print("Inception Score:", evaluator.compute_inception_score(sample_acts[0]))
    print("FID:", sample_stats.frechet_distance(ref_stats))
    print("sFID:", sample_stats_spatial.frechet_distance(ref_stats_spatial))
    prec, recall = evaluator.compute_prec_recall(ref_acts[0], sample_acts[0])
    print("Precision:", prec)
    print("Recall:", recall)


def run_cli(main_fn: Callable[[], None]) -> None:
    """Run main_fn; an EvaluatorError prints `error: <message>` and exits 2, Ctrl-C exits 130 (no traceback)."""
    try:
        main_fn()
    except EvaluatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _require_tensorflow() -> None:
    if tf is None:
        raise EvaluatorError(
            f"TensorFlow could not be imported ({_TF_IMPORT_ERROR}); install the evaluator's requirements with "
            "`pip install -r evaluations/requirements.txt` (tensorflow or tensorflow-cpu 2.x)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Statistics and scores


class InvalidFIDException(Exception):
    """Kept from the reference (unused there too)."""


class FIDStatistics:
    """Mean and covariance of Inception activations; the Frechet distance between two of them is FID (or sFID)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        """
        Compute the Frechet distance between two sets of statistics.
        """
        # The TTUR formula (bioinf-jku/TTUR fid.py), as the reference.
        mu1, sigma1 = self.mu, self.sigma
        mu2, sigma2 = other.mu, other.sigma

        mu1 = np.atleast_1d(mu1)
        mu2 = np.atleast_1d(mu2)

        sigma1 = np.atleast_2d(sigma1)
        sigma2 = np.atleast_2d(sigma2)

        assert (
            mu1.shape == mu2.shape
        ), f"Training and test mean vectors have different lengths: {mu1.shape}, {mu2.shape}"
        assert (
            sigma1.shape == sigma2.shape
        ), f"Training and test covariances have different dimensions: {sigma1.shape}, {sigma2.shape}"

        diff = mu1 - mu2

        # The product might be almost singular.
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            msg = "fid calculation produces singular product; adding %s to diagonal of cov estimates" % eps
            warnings.warn(msg)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

        # Numerical error might give a slight imaginary component.
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                m = np.max(np.abs(covmean.imag))
                raise ValueError("Imaginary component {}".format(m))
            covmean = covmean.real

        tr_covmean = np.trace(covmean)

        return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm(a) quietly, as the reference's sqrtm(a, disp=False)[0], on SciPy before and after 1.18.

    SciPy 1.16 deprecated `disp` (1.18 removes it); the square root itself is the same call either way.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # "matrix is singular": disp=False kept it quiet
        try:
            result = linalg.sqrtm(a, disp=False)
        except TypeError:  # SciPy >= 1.18: no `disp`, returns the root alone
            return linalg.sqrtm(a)
    return result[0] if isinstance(result, tuple) else result


class Evaluator:
    """Runs the Inception graph over image batches and turns the activations into the reference's scores."""

    def __init__(
        self,
        session,
        batch_size: int = 64,
        softmax_batch_size: int = 512,
        inception_path: Optional[str] = None,
    ):
        _require_tensorflow()
        self.sess = session
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.inception_path = resolve_inception_path(inception_path)
        self.manifold_estimator = ManifoldEstimator(session)
        with self.sess.graph.as_default():
            self.image_input = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            self.softmax_input = tf.placeholder(tf.float32, shape=[None, 2048])
            self.pool_features, self.spatial_features = _create_feature_graph(self.image_input, self.inception_path)
            self.softmax = _create_softmax_graph(self.softmax_input, self.inception_path)

    def warmup(self) -> None:
        """Run one small batch (eight 64x64 images) so graph set-up time is not charged to the first real batch."""
        self.compute_activations(np.zeros([1, 8, 64, 64, 3]), desc="warm-up")

    def read_activations(self, npz_path: str) -> Tuple[np.ndarray, np.ndarray]:
        """Stream arr_0 of an .npz in batches of batch_size through the graph; returns (pool_3, spatial)."""
        with open_npz_array(npz_path, "arr_0") as reader:
            return self.compute_activations(
                reader.read_batches(self.batch_size), desc=f"activations {os.path.basename(npz_path)}"
            )

    def batch_activations(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Activations of one NHWC batch in [0, 255]: pool_3 as [N, 2048] and the spatial features as [N, 2023]."""
        batch = batch.astype(np.float32)
        pred, spatial_pred = self.sess.run([self.pool_features, self.spatial_features], {self.image_input: batch})
        return pred.reshape([pred.shape[0], -1]), spatial_pred.reshape([spatial_pred.shape[0], -1])

    def compute_activations(
        self, batches: Iterable[np.ndarray], desc: Optional[str] = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """
        Compute image features for downstream evals.

        :param batches: a iterator over NHWC numpy arrays in [0, 255].
        :param desc: the progress bar's label.
        :return: a tuple of numpy arrays of shape [N x X], where X is a feature
                 dimension. The tuple is (pool_3, spatial).
        """
        preds = []
        spatial_preds = []
        for batch in tqdm(batches, desc=desc, unit="batch"):
            pred, spatial_pred = self.batch_activations(batch)
            preds.append(pred)
            spatial_preds.append(spatial_pred)
        return (
            np.concatenate(preds, axis=0),
            np.concatenate(spatial_preds, axis=0),
        )

    def read_statistics(
        self, npz_path: str, activations: Tuple[np.ndarray, np.ndarray]
    ) -> Tuple[FIDStatistics, FIDStatistics]:
        """The batch's precomputed (mu, sigma) and (mu_s, sigma_s) when it has "mu"; else computed from activations."""
        with np.load(npz_path) as obj:
            if "mu" in list(obj.keys()):
                missing = [k for k in STATISTICS_KEYS if k not in obj.keys()]
                if missing:
                    raise NpzFormatError(
                        f"{npz_path} has precomputed statistics 'mu' but lacks {', '.join(missing)}; a reference "
                        "batch needs all of mu, sigma, mu_s, sigma_s (rebuild it with "
                        "evaluations/make_reference_batch.py)"
                    )
                return FIDStatistics(obj["mu"], obj["sigma"]), FIDStatistics(obj["mu_s"], obj["sigma_s"])
        return tuple(self.compute_statistics(x) for x in activations)

    def compute_statistics(self, activations: np.ndarray) -> FIDStatistics:
        """Mean and covariance (np.cov, N-1 normalisation) of activations."""
        mu = np.mean(activations, axis=0)
        sigma = np.cov(activations, rowvar=False)
        return FIDStatistics(mu, sigma)

    def compute_inception_score(self, activations: np.ndarray, split_size: int = 5000) -> float:
        """Inception Score: exp(mean KL(p(y|x) || p(y))) per split of split_size samples, averaged over splits."""
        softmax_out = []
        for i in range(0, len(activations), self.softmax_batch_size):
            acts = activations[i : i + self.softmax_batch_size]
            softmax_out.append(self.sess.run(self.softmax, feed_dict={self.softmax_input: acts}))
        preds = np.concatenate(softmax_out, axis=0)
        # As openai/improved-gan's inception_score/model.py.
        scores = []
        for i in range(0, len(preds), split_size):
            part = preds[i : i + split_size]
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
            kl = np.mean(np.sum(kl, 1))
            scores.append(np.exp(kl))
        return float(np.mean(scores))

    def compute_prec_recall(
        self, activations_ref: np.ndarray, activations_sample: np.ndarray
    ) -> Tuple[float, float]:
        """Improved precision and recall (k=3 nearest-neighbour manifolds) of the samples against the reference."""
        radii_1 = self.manifold_estimator.manifold_radii(activations_ref)
        radii_2 = self.manifold_estimator.manifold_radii(activations_sample)
        pr = self.manifold_estimator.evaluate_pr(activations_ref, radii_1, activations_sample, radii_2)
        return (float(pr[0][0]), float(pr[1][0]))


class ManifoldEstimator:
    """
    A helper for comparing manifolds of feature vectors.

    Adapted (by the reference) from kynkaat/improved-precision-and-recall-metric, precision_recall.py.
    """

    def __init__(
        self,
        session,
        row_batch_size: int = 10000,
        col_batch_size: int = 10000,
        nhood_sizes: Tuple[int, ...] = (3,),
        clamp_to_percentile: Optional[float] = None,
        eps: float = 1e-5,
    ):
        """
        Estimate the manifold of given feature vectors.

        :param session: the TensorFlow session.
        :param row_batch_size: row batch size to compute pairwise distances
                               (parameter to trade-off between memory usage and performance).
        :param col_batch_size: column batch size to compute pairwise distances.
        :param nhood_sizes: number of neighbors used to estimate the manifold.
        :param clamp_to_percentile: prune hyperspheres that have radius larger than
                                    the given percentile.
        :param eps: small number for numerical stability.
        """
        self.distance_block = DistanceBlock(session)
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = nhood_sizes
        self.num_nhoods = len(nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def warmup(self) -> None:
        """Run the distance graph once on a single zero feature."""
        feats, radii = (
            np.zeros([1, 2048], dtype=np.float32),
            np.zeros([1, 1], dtype=np.float32),
        )
        self.evaluate_pr(feats, radii, feats, radii)

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """Squared distance of each feature to its k-th nearest neighbour (self excluded), float32 [N, len(k)]."""
        num_images = len(features)

        # Estimate manifold of features by calculating distances to k-NN of each sample.
        radii = np.zeros([num_images, self.num_nhoods], dtype=np.float32)
        distance_batch = np.zeros([self.row_batch_size, num_images], dtype=np.float32)
        seq = np.arange(max(self.nhood_sizes) + 1, dtype=np.int32)

        for begin1 in range(0, num_images, self.row_batch_size):
            end1 = min(begin1 + self.row_batch_size, num_images)
            row_batch = features[begin1:end1]

            for begin2 in range(0, num_images, self.col_batch_size):
                end2 = min(begin2 + self.col_batch_size, num_images)
                col_batch = features[begin2:end2]

                # Compute distances between batches.
                distance_batch[0 : end1 - begin1, begin2:end2] = self.distance_block.pairwise_distances(
                    row_batch, col_batch
                )

            # Find the k-nearest neighbor from the current batch.
            radii[begin1:end1, :] = np.concatenate(
                [
                    x[:, self.nhood_sizes]
                    for x in _numpy_partition(distance_batch[0 : end1 - begin1, :], seq, axis=1)
                ],
                axis=0,
            )

        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate(self, features: np.ndarray, radii: np.ndarray, eval_features: np.ndarray) -> dict:
        """
        Evaluate if new feature vectors are at the manifold.
        """
        num_eval_images = eval_features.shape[0]
        num_ref_images = radii.shape[0]
        distance_batch = np.zeros([self.row_batch_size, num_ref_images], dtype=np.float32)
        batch_predictions = np.zeros([num_eval_images, self.num_nhoods], dtype=np.int32)
        max_realism_score = np.zeros([num_eval_images], dtype=np.float32)
        nearest_indices = np.zeros([num_eval_images], dtype=np.int32)

        for begin1 in range(0, num_eval_images, self.row_batch_size):
            end1 = min(begin1 + self.row_batch_size, num_eval_images)
            feature_batch = eval_features[begin1:end1]

            for begin2 in range(0, num_ref_images, self.col_batch_size):
                end2 = min(begin2 + self.col_batch_size, num_ref_images)
                ref_batch = features[begin2:end2]

                distance_batch[0 : end1 - begin1, begin2:end2] = self.distance_block.pairwise_distances(
                    feature_batch, ref_batch
                )

            # A feature vector inside the hypersphere of some reference sample lies on the estimated manifold;
            # the radii of the hyperspheres are the distances to the k-th neighbour.
            samples_in_manifold = distance_batch[0 : end1 - begin1, :, None] <= radii
            batch_predictions[begin1:end1] = np.any(samples_in_manifold, axis=1).astype(np.int32)

            max_realism_score[begin1:end1] = np.max(
                radii[:, 0] / (distance_batch[0 : end1 - begin1, :] + self.eps), axis=1
            )
            nearest_indices[begin1:end1] = np.argmin(distance_batch[0 : end1 - begin1, :], axis=1)

        return {
            "fraction": float(np.mean(batch_predictions)),
            "batch_predictions": batch_predictions,
            "max_realisim_score": max_realism_score,  # the reference's spelling
            "nearest_indices": nearest_indices,
        }

    def evaluate_pr(
        self,
        features_1: np.ndarray,
        radii_1: np.ndarray,
        features_2: np.ndarray,
        radii_2: np.ndarray,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """
        Evaluate precision and recall efficiently.

        :param features_1: [N1 x D] feature vectors for reference batch.
        :param radii_1: [N1 x K1] radii for reference vectors.
        :param features_2: [N2 x D] feature vectors for the other batch.
        :param radii_2: [N x K2] radii for other vectors.
        :return: a tuple of arrays for (precision, recall):
                 - precision: an np.ndarray of length K1
                 - recall: an np.ndarray of length K2
        """
        # The reference writes np.bool here, which NumPy >= 1.24 removed; the builtin bool is the same dtype.
        features_1_status = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
        features_2_status = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
        for begin_1 in range(0, len(features_1), self.row_batch_size):
            end_1 = begin_1 + self.row_batch_size
            batch_1 = features_1[begin_1:end_1]
            for begin_2 in range(0, len(features_2), self.col_batch_size):
                end_2 = begin_2 + self.col_batch_size
                batch_2 = features_2[begin_2:end_2]
                batch_1_in, batch_2_in = self.distance_block.less_thans(
                    batch_1, radii_1[begin_1:end_1], batch_2, radii_2[begin_2:end_2]
                )
                features_1_status[begin_1:end_1] |= batch_1_in
                features_2_status[begin_2:end_2] |= batch_2_in
        return (
            np.mean(features_2_status.astype(np.float64), axis=0),
            np.mean(features_1_status.astype(np.float64), axis=0),
        )


class DistanceBlock:
    """
    Calculate pairwise distances between vectors.

    Squared Euclidean distances, computed in float16 first and recomputed in float32 only when the float16 block
    has a non-finite entry (as the reference, adapted from kynkaat/improved-precision-and-recall-metric).
    """

    def __init__(self, session):
        _require_tensorflow()
        self.session = session

        # Initialize TF graph to calculate pairwise distances.
        with session.graph.as_default():
            self._features_batch1 = tf.placeholder(tf.float32, shape=[None, None])
            self._features_batch2 = tf.placeholder(tf.float32, shape=[None, None])
            distance_block_16 = _batch_pairwise_distances(
                tf.cast(self._features_batch1, tf.float16),
                tf.cast(self._features_batch2, tf.float16),
            )
            self.distance_block = tf.cond(
                tf.reduce_all(tf.math.is_finite(distance_block_16)),
                lambda: tf.cast(distance_block_16, tf.float32),
                lambda: _batch_pairwise_distances(self._features_batch1, self._features_batch2),
            )

            # Extra logic for less thans.
            self._radii1 = tf.placeholder(tf.float32, shape=[None, None])
            self._radii2 = tf.placeholder(tf.float32, shape=[None, None])
            dist32 = tf.cast(self.distance_block, tf.float32)[..., None]
            self._batch_1_in = tf.math.reduce_any(dist32 <= self._radii2, axis=1)
            self._batch_2_in = tf.math.reduce_any(dist32 <= self._radii1[:, None], axis=0)

    def pairwise_distances(self, U: np.ndarray, V: np.ndarray) -> np.ndarray:
        """
        Evaluate pairwise distances between two batches of feature vectors.
        """
        return self.session.run(
            self.distance_block,
            feed_dict={self._features_batch1: U, self._features_batch2: V},
        )

    def less_thans(
        self, batch_1: np.ndarray, radii_1: np.ndarray, batch_2: np.ndarray, radii_2: np.ndarray
    ) -> List[np.ndarray]:
        """For each row of batch_1: inside some ball of batch_2? For each row of batch_2: inside some of batch_1?"""
        return self.session.run(
            [self._batch_1_in, self._batch_2_in],
            feed_dict={
                self._features_batch1: batch_1,
                self._features_batch2: batch_2,
                self._radii1: radii_1,
                self._radii2: radii_2,
            },
        )


def _batch_pairwise_distances(U, V):
    """
    Compute pairwise distances between two batches of feature vectors.
    """
    with tf.variable_scope("pairwise_dist_block"):
        # Squared norms of each row in U and V.
        norm_u = tf.reduce_sum(tf.square(U), 1)
        norm_v = tf.reduce_sum(tf.square(V), 1)

        # norm_u as a column and norm_v as a row vectors.
        norm_u = tf.reshape(norm_u, [-1, 1])
        norm_v = tf.reshape(norm_v, [1, -1])

        # Pairwise squared Euclidean distances.
        D = tf.maximum(norm_u - 2 * tf.matmul(U, V, False, True) + norm_v, 0.0)

    return D


# ----------------------------------------------------------------------------------------------------------------
# Streaming arr_0 out of an .npz (a zip of .npy files) without loading the whole array


class NpzArrayReader(ABC):
    """Reads one array of an .npz in batches along its first axis."""

    @abstractmethod
    def read_batch(self, batch_size: int) -> Optional[np.ndarray]:
        """The next (at most) batch_size rows, or None at the end."""

    @abstractmethod
    def remaining(self) -> int:
        """How many rows are left."""

    def read_batches(self, batch_size: int) -> "BatchIterator":
        """An iterable over all remaining rows in batches, with a len() for progress bars."""

        def gen_fn():
            while True:
                batch = self.read_batch(batch_size)
                if batch is None:
                    break
                yield batch

        rem = self.remaining()
        num_batches = rem // batch_size + int(rem % batch_size != 0)
        return BatchIterator(gen_fn, num_batches)


class BatchIterator:
    """An iterable of batches that knows how many there are."""

    def __init__(self, gen_fn: Callable[[], Iterator[np.ndarray]], length: int):
        self.gen_fn = gen_fn
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.gen_fn()


class StreamingNpzArrayReader(NpzArrayReader):
    """Reads rows straight from the .npy stream inside the zip (C-order, non-object arrays)."""

    def __init__(self, arr_f, shape: Tuple[int, ...], dtype: np.dtype):
        self.arr_f = arr_f
        self.shape = shape
        self.dtype = dtype
        self.idx = 0

    def read_batch(self, batch_size: int) -> Optional[np.ndarray]:
        if self.idx >= self.shape[0]:
            return None

        bs = min(batch_size, self.shape[0] - self.idx)
        self.idx += bs

        if self.dtype.itemsize == 0:
            return np.ndarray([bs, *self.shape[1:]], dtype=self.dtype)

        read_count = bs * np.prod(self.shape[1:])
        read_size = int(read_count * self.dtype.itemsize)
        data = _read_bytes(self.arr_f, read_size, "array data")
        return np.frombuffer(data, dtype=self.dtype).reshape([bs, *self.shape[1:]])

    def remaining(self) -> int:
        return max(0, self.shape[0] - self.idx)


class MemoryNpzArrayReader(NpzArrayReader):
    """Loads the whole array (Fortran-order, object, or unknown .npy versions) and serves it in batches."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.idx = 0

    @classmethod
    def load(cls, path: str, arr_name: str) -> "MemoryNpzArrayReader":
        with open(path, "rb") as f:
            arr = np.load(f)[arr_name]
        return cls(arr)

    def read_batch(self, batch_size: int) -> Optional[np.ndarray]:
        if self.idx >= self.arr.shape[0]:
            return None

        res = self.arr[self.idx : self.idx + batch_size]
        self.idx += batch_size
        return res

    def remaining(self) -> int:
        return max(0, self.arr.shape[0] - self.idx)


@contextmanager
def open_npz_array(path: str, arr_name: str) -> Iterator[NpzArrayReader]:
    """A reader over arr_name of the .npz at path, streaming from the zip when the .npy layout allows it."""
    with _open_npy_file(path, arr_name) as arr_f:
        header = _read_npy_header(arr_f)
        if header is None:
            yield MemoryNpzArrayReader.load(path, arr_name)
            return
        shape, fortran, dtype = header
        if fortran or dtype.hasobject:
            yield MemoryNpzArrayReader.load(path, arr_name)
        else:
            yield StreamingNpzArrayReader(arr_f, shape, dtype)


def _read_npy_header(arr_f) -> Optional[Tuple[Tuple[int, ...], bool, np.dtype]]:
    """(shape, fortran_order, dtype) of a .npy stream of format 1.0 or 2.0; None for other versions."""
    version = np.lib.format.read_magic(arr_f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(arr_f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(arr_f)
    return None


def _read_bytes(fp, size: int, error_template: str = "ran out of data") -> bytes:
    """
    Read from file-like object until size bytes are read (as numpy.lib.format._read_bytes).

    Raises ValueError if EOF is encountered before size bytes are read; a zip member stream
    may return less data than requested per read.
    """
    data = bytes()
    while True:
        try:
            r = fp.read(size - len(data))
            data += r
            if len(r) == 0 or len(data) == size:
                break
        except io.BlockingIOError:
            pass
    if len(data) != size:
        msg = "EOF: reading %s, expected %d bytes got %d"
        raise ValueError(msg % (error_template, size, len(data)))
    return data


@contextmanager
def _open_npy_file(path: str, arr_name: str):
    with open(path, "rb") as f:
        with zipfile.ZipFile(f, "r") as zip_f:
            if f"{arr_name}.npy" not in zip_f.namelist():
                raise NpzFormatError(f"missing {arr_name} in npz file {path}")
            with zip_f.open(f"{arr_name}.npy", "r") as arr_f:
                yield arr_f


@dataclass
class NpzInfo:
    """What a batch holds: its path, arr_0's shape and dtype, and whether it carries precomputed statistics."""

    path: str
    shape: Tuple[int, ...]
    dtype: np.dtype
    has_statistics: bool

    @property
    def num_images(self) -> int:
        return int(self.shape[0])

    def image_size(self) -> str:
        """HxWxC of one image, e.g. 256x256x3."""
        return "x".join(str(int(d)) for d in self.shape[1:])

    def summary(self) -> str:
        """One phrase for the `read:` line."""
        stats = "precomputed statistics" if self.has_statistics else "statistics from its images"
        return f"{os.path.basename(self.path)}: {self.num_images} images of {self.image_size()} {self.dtype} ({stats})"


def describe_npz(path: str) -> NpzInfo:
    """Check that path is an .npz with NHWC RGB images in arr_0 and say what it holds, without loading it."""
    if not os.path.isfile(path):
        raise NpzFormatError(
            f"no such file: {path}; pass the path of an .npz batch (a sampling script's samples_*.npz, a released "
            "reference batch such as VIRTUAL_imagenet256_labeled.npz, or one built by make_reference_batch.py)"
        )
    try:
        with zipfile.ZipFile(path, "r") as zip_f:
            names = zip_f.namelist()
        with _open_npy_file(path, "arr_0") as arr_f:
            header = _read_npy_header(arr_f)
    except zipfile.BadZipFile as exc:
        raise NpzFormatError(
            f"{path} is not a readable .npz file ({exc}); if it was downloaded, the download is incomplete: "
            "download it again"
        ) from None
    except NpzFormatError:
        keys = ", ".join(n[: -len(".npy")] if n.endswith(".npy") else n for n in names) or "none"
        raise NpzFormatError(
            f"{path} has no arr_0 (its arrays: {keys}); the evaluator reads images from arr_0 "
            "(save them with np.savez(path, images) or np.savez(path, arr_0=images))"
        ) from None
    except ValueError as exc:  # a corrupt .npy header
        raise NpzFormatError(f"arr_0 in {path} is not a valid .npy array ({exc}); write the batch again") from None
    if header is None:
        with np.load(path) as obj:
            arr = obj["arr_0"]
        shape, dtype = arr.shape, arr.dtype
    else:
        shape, _, dtype = header
    if len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise NpzFormatError(
            f"arr_0 in {path} has shape {tuple(shape)}; the evaluator needs RGB images as N x H x W x 3 (NHWC, "
            "uint8 values 0..255). Convert NCHW arrays with arr.transpose(0, 2, 3, 1)"
        )
    has_statistics = "mu.npy" in names
    if has_statistics:
        missing = [k for k in STATISTICS_KEYS if f"{k}.npy" not in names]
        if missing:
            raise NpzFormatError(
                f"{path} has precomputed statistics 'mu' but lacks {', '.join(missing)}; a reference batch needs "
                "all of mu, sigma, mu_s, sigma_s (rebuild it with evaluations/make_reference_batch.py)"
            )
    return NpzInfo(path=path, shape=tuple(int(d) for d in shape), dtype=np.dtype(dtype), has_statistics=has_statistics)


def comparison_notes(ref: NpzInfo, sample: NpzInfo) -> List[str]:
    """Warnings about a comparison that will not match published numbers (sizes differ, few samples)."""
    notes = []
    if ref.shape[1:] != sample.shape[1:]:
        notes.append(
            f"the reference images are {ref.image_size()} but the samples are {sample.image_size()}; "
            "use the reference batch of the samples' resolution"
        )
    if sample.num_images != 50000:
        notes.append(
            f"the sample batch has {sample.num_images} images; published FID/sFID/IS use 50000 samples "
            "(FID is biased upwards for fewer), so compare only with numbers computed from the same count"
        )
    if sample.dtype != np.uint8 or ref.dtype != np.uint8:
        notes.append("the evaluator expects uint8 images with values 0..255; other dtypes are used as they are")
    return notes


def _check_enough_for_prec_recall(ref: NpzInfo, sample: NpzInfo) -> None:
    for info in (ref, sample):
        if info.num_images < 4:
            raise NpzFormatError(
                f"{info.path} has {info.num_images} images; precision and recall need at least 4 per batch (the "
                "manifold radius is the distance to the 3rd nearest neighbour)"
            )


# ----------------------------------------------------------------------------------------------------------------
# The Inception graph


def resolve_inception_path(path: Optional[str] = None) -> str:
    """Where the Inception graph is (or goes): path if given, else $ADM_INCEPTION_PATH, else ./classify_image_graph_def.pb."""
    if path:
        return path
    return os.environ.get(INCEPTION_PATH_ENV) or INCEPTION_V3_PATH


def _download_inception_model(path: str = INCEPTION_V3_PATH, url: Optional[str] = None) -> str:
    """Download the Inception graph to path unless it is already there; returns path."""
    if os.path.exists(path):
        return path
    url = url or os.environ.get(INCEPTION_URL_ENV) or INCEPTION_V3_URL
    where = os.path.abspath(path)
    by_hand = (
        f"download {INCEPTION_V3_URL} (about 100 MB) by hand and save it as {where}, or point --inception_path "
        f"(or ${INCEPTION_PATH_ENV}) at a copy you already have"
    )
    print(f"downloading InceptionV3 model from {url} to {where}...")
    tmp_path = path + ".tmp"
    folder = os.path.dirname(where)
    made_folder = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with requests.get(url, stream=True, timeout=60) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length") or 0) or None
            written = 0
            with open(tmp_path, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="inception") as bar:
                for chunk in r.iter_content(chunk_size=8192):
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        if total is not None and written != total:
            raise OSError(f"the download stopped after {written} of {total} bytes")
        os.replace(tmp_path, path)
    except (requests.RequestException, OSError) as exc:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if made_folder and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # leave nothing behind
        raise DownloadError(
            f"could not download the Inception graph from {url} ({type(exc).__name__}: {exc}); {by_hand}"
        ) from None
    return path


def _read_graph_def(path: str):
    """The parsed GraphDef of the Inception graph file."""
    with open(path, "rb") as f:
        data = f.read()
    graph_def = tf.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise EvaluatorError(
            f"{path} is not a valid TensorFlow graph ({type(exc).__name__}: {exc}); delete it and run again to "
            f"download it afresh from {INCEPTION_V3_URL}"
        ) from None
    return graph_def


def _import_inception(graph_def, path: str, return_elements: List[str], input_map=None) -> list:
    prefix = f"{random.randrange(2**32)}_{random.randrange(2**32)}"
    try:
        return tf.import_graph_def(graph_def, input_map=input_map, return_elements=return_elements, name=prefix)
    except ValueError as exc:  # a graph without the Inception tensors
        raise EvaluatorError(
            f"{path} is not the Inception graph classify_image_graph_def.pb ({exc}); delete it and run again to "
            f"download it from {INCEPTION_V3_URL}"
        ) from None


def _create_feature_graph(input_batch, inception_path: str = INCEPTION_V3_PATH):
    """Import the graph with input_batch in place of ExpandDims:0; returns pool_3 and the first 7 mixed_6/conv channels."""
    _download_inception_model(inception_path)
    graph_def = _read_graph_def(inception_path)
    pool3, spatial = _import_inception(
        graph_def,
        inception_path,
        [FID_POOL_NAME, FID_SPATIAL_NAME],
        input_map={"ExpandDims:0": input_batch},
    )
    _update_shapes(pool3)
    spatial = spatial[..., :7]
    return pool3, spatial


def _create_softmax_graph(input_batch, inception_path: str = INCEPTION_V3_PATH):
    """Softmax over the 1008 Inception classes of input_batch @ W (the logits weight, no bias), as the reference."""
    _download_inception_model(inception_path)
    graph_def = _read_graph_def(inception_path)
    (matmul,) = _import_inception(graph_def, inception_path, ["softmax/logits/MatMul"])
    w = matmul.inputs[1]
    logits = tf.matmul(input_batch, w)
    return tf.nn.softmax(logits)


def _update_shapes(pool3):
    """Relax static batch dimensions of 1 to None (TTUR fid.py). Under TF 2.x import_graph_def already infers
    shapes from the mapped placeholder, so this only matters for older graphs; kept for faithfulness."""
    ops = pool3.graph.get_operations()
    for op in ops:
        for o in op.outputs:
            shape = o.get_shape()
            if shape.rank is None:
                continue
            dims = shape.as_list()
            if dims and dims[0] == 1:
                try:
                    o.__dict__["_shape_val"] = tf.TensorShape([None] + dims[1:])
                except (AttributeError, TypeError):  # tensor types without a __dict__
                    pass
    return pool3


def _numpy_partition(arr: np.ndarray, kth, **kwargs) -> list:
    """np.partition of arr's rows, split across cpu_count() threads."""
    num_workers = min(cpu_count(), len(arr))
    chunk_size = len(arr) // num_workers
    extra = len(arr) % num_workers

    start_idx = 0
    batches = []
    for i in range(num_workers):
        size = chunk_size + (1 if i < extra else 0)
        batches.append(arr[start_idx : start_idx + size])
        start_idx += size

    with ThreadPool(num_workers) as pool:
        return list(pool.map(partial(np.partition, kth=kth, **kwargs), batches))


if __name__ == "__main__":
    run_cli(main)
