"""What turns a trained network into a bundle, the same for every command that makes one (train, ensemble):
calibration and threshold (skin_ray.calibration), the safeguards fitted on the same split, and the
description. Also re-deriving a bundle's split from its data, for commands that refit what a bundle holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from skin_ray import classifier_stats, gate_images, safeguards, storage
from skin_ray.bundle import Bundle, BundleMetadata, describe_bundle, load_bundle, write_safeguards
from skin_ray.calibration import calibrate
from skin_ray.config import FitSafeguardsSettings, ThresholdSettings
from skin_ray.data import LabelledImages, Split, discover_sources, pixel_dataset, recorded_split, split_by_content
from skin_ray.drift import DriftReference, Observations, image_statistics
from skin_ray.predictor import Analyser
from skin_ray.preprocess import InputSpec, to_model_input
from skin_ray.real_outliers import RealOutliers, read_real_outliers
from skin_ray.safeguards import GateInputs, InputGate
from skin_ray.scoring import scored_batches

logger = logging.getLogger(__name__)


def finalize_bundle(
    model, spec: InputSpec, split: Split, arch: str, rule: ThresholdSettings, training: dict, outliers: str | None = None
) -> tuple[BundleMetadata, InputGate, DriftReference]:
    """Calibrate `model` (which takes `spec`'s input) in place, choose its threshold by `rule`, fit its safeguards
    (the gate also against the real images that are not dermoscopy in the folder `outliers`, if given) and drift
    reference, describe the bundle: what `save_bundle` then writes. Each split is decoded once, for all of them."""
    train, validation = split_pixel_datasets(split, spec)
    positive = split.train.positive_index
    threshold, bundle_metrics = calibrate(model, positive, validation, rule, split.validation.sources())
    real = read_real_outliers(outliers, spec) if outliers else None
    inputs = safeguard_inputs(model, positive, train, validation, real)
    gate, input_gate, uncertainty, drift = fit_safeguards_on(inputs, threshold)
    bundle_metrics["validation_by"] = validation_breakdown(split.validation, inputs, threshold)
    metadata = describe_bundle(model, arch, split, threshold, rule.target_sensitivity, bundle_metrics, training)
    metadata.input_gate, metadata.uncertainty = input_gate, uncertainty
    return metadata, gate, drift


# What gets figures of its own in bundle.json beside each data tree: the metadata tables' diagnosis, and the
# subgroups a model card reports (sex, age in bands of twenty years, body site). Name in bundle.json: column.
BREAKDOWN_COLUMNS = {"diagnosis": "dx", "sex": "sex", "age_band": "age", "site": "localization"}


def age_band(age: str) -> str:
    """An age in years (HAM10000 gives them in fives) as a band of twenty years; "" where unknown."""
    try:
        low = int(float(age)) // 20 * 20
    except ValueError:
        return ""
    return f"{low}-{low + 19}"


def breakdown_groups(images: LabelledImages) -> dict[str, list[str]]:
    """Each image's data tree and its BREAKDOWN_COLUMNS values ("" where its table gives none)."""
    groups = {"source": images.sources(), **{name: images.attribute(column) for name, column in BREAKDOWN_COLUMNS.items()}}
    groups["age_band"] = [age_band(age) for age in groups["age_band"]]
    return groups


def validation_breakdown(validation: LabelledImages, inputs: SafeguardInputs, threshold: float) -> dict:
    """The validation figures of each data tree and of each value of BREAKDOWN_COLUMNS that the tables give."""
    order = {path: index for index, path in enumerate(validation.paths)}
    rows = [order[path] for path in inputs.validation_paths]
    return {
        name: classifier_stats.by_group(inputs.is_cancer, inputs.p_cancer, threshold, np.asarray(values)[rows])
        for name, values in breakdown_groups(validation).items() if any(values)
    }


@dataclass(frozen=True)
class SafeguardInputs:
    """What the safeguards are fitted on once the network has seen the images."""

    dermoscopy: GateInputs  # the training split's views
    train_labels: np.ndarray  # their classes
    groups: np.ndarray  # the training image each view comes from
    outliers: GateInputs  # images that are not dermoscopy, generated and real
    kinds: np.ndarray  # their kinds
    sources: np.ndarray  # where each came from: safeguards.GENERATED, or a real one's repository
    validation: GateInputs
    validation_paths: np.ndarray  # the validation images, in the order of the rows below
    is_cancer: np.ndarray  # validation truth
    p_cancer: np.ndarray  # calibrated Cancer probability on validation
    member_cancer: np.ndarray | None  # members' ones (None: a single network)
    image: dict[str, np.ndarray]  # `image_statistics` of validation


def safeguard_inputs(model, positive_index: int, train, validation, real: RealOutliers | None = None) -> SafeguardInputs:
    """The model's view of the split's `pixel_dataset`s, of generated images and of the `real` ones that are not
    dermoscopy, for `fit_safeguards_on`.

    The gate's dermoscopy is the training split as the model saw it in training (every image, and every image
    zoomed out onto skin as the augmentation does), re-photographed and as another device gives it
    (skin_ray.gate_images); the generated images it is fitted against come from the same seed every time. Its
    threshold and the margin come from the validation split.
    """
    from skin_ray.model import RandomZoomOutOntoSkin

    analyse = Analyser(model, positive_index)
    zoom_out = RandomZoomOutOntoSkin(probability=1.0, seed=0)
    rng = np.random.default_rng(0)
    views, labels, groups, lesions = [], [], [], []
    for batch in train.iter_batches(batch_size=64):
        images = to_model_input(batch["pixels"])
        rephotographed = to_model_input(gate_images.rephotographed(batch["pixels"], rng))
        other_device = to_model_input(gate_images.another_device(batch["pixels"], rng))
        zoomed_out = np.clip(np.asarray(zoom_out(images, training=True)), 0, 1)
        for view in (images, zoomed_out, rephotographed, other_device):
            views.append(analyse(view).gate_inputs)
            labels.append(batch["label"])
            groups.append(np.arange(len(images)) + sum(len(part) for part in lesions))
        lesions.append(batch["pixels"])
    outliers, kinds, sources = outlier_inputs(analyse, np.concatenate(lesions)[::16], real)
    p_cancer, members, inputs, image, truth, paths = [], [], [], [], [], []
    for batch, analysis in scored_batches(validation, lambda pixels: analyse(to_model_input(pixels))):
        paths.append(batch["path"])
        p_cancer.append(analysis.probabilities[:, positive_index])
        members.append(analysis.member_cancer)
        inputs.append(analysis.gate_inputs)
        image.append(image_statistics(batch["pixels"], batch["megapixels"]))
        truth.append(batch["label"] == positive_index)
    return SafeguardInputs(
        GateInputs.concatenate(views), np.concatenate(labels), np.concatenate(groups), outliers, kinds, sources,
        GateInputs.concatenate(inputs), np.concatenate(paths), np.concatenate(truth), np.concatenate(p_cancer),
        None if members[0] is None else np.concatenate(members),
        {name: np.concatenate([part[name] for part in image]) for name in image[0]},
    )


def outlier_inputs(
    analyse: Analyser, lesions: np.ndarray, real: RealOutliers | None = None
) -> tuple[GateInputs, np.ndarray, np.ndarray]:
    """The gate's inputs for the images of every kind in `gate_images.NOT_DERMOSCOPY` (generated from seed 1,
    `lesions`, model-input pixels, lent to the clinical photographs), through JPEG and the one preprocessing to the
    lesions' size, and for the `real` ones (their kinds marked "(real)"); each one's kind and source."""
    drawn = gate_images.not_dermoscopy_pixels(lesions.shape[1], lesions, seed=1)
    groups = [(pixels, np.full(len(pixels), kind), np.full(len(pixels), safeguards.GENERATED)) for kind, pixels in drawn.items()]
    if real is not None:
        groups.append((real.pixels, np.char.add(real.kinds.astype(str), " (real)"), real.sources))
    parts = [analyse(to_model_input(pixels[start : start + 64])).gate_inputs
             for pixels, _, _ in groups for start in range(0, len(pixels), 64)]
    return GateInputs.concatenate(parts), *(np.concatenate([group[i] for group in groups]) for i in (1, 2))


def fit_safeguards_on(inputs: SafeguardInputs, threshold: float) -> tuple[InputGate, dict, dict, DriftReference]:
    """The input gate and the uncertainty margin of a calibrated model, with their bundle.json descriptions,
    and the drift reference (skin_ray.drift) they give on validation, from what the network made of the images."""
    gate, outlier_figures = safeguards.fit_input_gate(
        inputs.dermoscopy, inputs.train_labels, inputs.groups, inputs.outliers, inputs.kinds, inputs.validation,
        inputs.sources,
    )
    p_cancer = inputs.p_cancer
    disagree = safeguards.members_disagree(inputs.member_cancer, threshold, len(p_cancer))
    y_true = np.asarray(inputs.is_cancer).astype(np.int64)
    margin = safeguards.uncertainty_margin(y_true, p_cancer, threshold, disagree)
    scores = gate.scores(inputs.validation)
    drift = DriftReference.of(Observations.of_arrays(
        ood_score=scores, cancer_probability=p_cancer, refused=scores > gate.threshold,
        uncertain=safeguards.is_uncertain(p_cancer, threshold, margin, disagree), cancer=p_cancer >= threshold,
        image=inputs.image,
    ))
    return gate, *safeguards.describe(gate, outlier_figures, margin, y_true, p_cancer, threshold, disagree), drift


def split_pixel_datasets(split: Split, spec: InputSpec) -> tuple:
    """The split's training and validation images decoded (once) to `spec`'s input, in the split's order:
    the gate's zoomed-out views are drawn in sequence, so another order fitted another gate (the shipped bundle's
    threshold moved 1.5% between two fits before)."""
    return pixel_dataset(split.train, spec, in_order=True), pixel_dataset(split.validation, spec, in_order=True)


def bundle_split(bundle: Bundle, data: list[str] | None = None) -> Split:
    """The split `bundle` was trained and calibrated on, found in `data` (by default the data trees it was trained
    on): by the content hashes it recorded, or, for a bundle that recorded only its training images, by the
    content-hash rule it was split by then; refused when an image it recorded is missing (or, for the older bundles,
    when the data's fingerprint differs)."""
    metadata = bundle.metadata
    recorded = metadata.data.get("sources") or [metadata.data["source"]]  # "source": one tree, before 0.2
    sources = data or recorded
    # The tables it read, where they still are, for the per-diagnosis and subgroup figures (the split itself is
    # found by content): each paired with its tree's place in `sources`.
    tables = [f"{sources[recorded.index(table['root'])]}={table['table']}" for table in metadata.data.get("tables", [])
              if table["root"] in recorded and storage.exists(table["table"])]
    images = discover_sources(sources, tables, class_names=tuple(metadata.class_names), subset=metadata.training.get("subset"))
    if bundle.validation_digests:
        provenance = {key: value for key, value in metadata.data.items() if key in ("tables", "group_column", "groups",
                                                                                     "duplicates_left_out")}
        split = recorded_split(images, metadata.input_spec, bundle.train_digests, bundle.validation_digests,
                               {"sources": list(sources), **provenance})
        # Checked by content, not by fingerprint: every image the bundle recorded must be found, and the error can
        # say how many are not (a fingerprint only says that something differs).
        found = set(split.train_digests) | set(split.validation_digests)
        missing = len((bundle.train_digests | bundle.validation_digests) - found)
        if missing:
            raise ValueError(f"{', '.join(sources)} is not the data {bundle.uri} was trained on ({missing} of its images "
                             "are not there)")
        return split
    split = split_by_content(images, metadata.input_spec, metadata.training["validation_fraction"])
    if split.fingerprint != metadata.data["fingerprint"]:
        raise ValueError(f"{', '.join(sources)} is not the data {bundle.uri} was trained on (its fingerprint differs)")
    return split


def add_safeguards(settings: FitSafeguardsSettings) -> BundleMetadata:
    """Fit the safeguards of an existing bundle on its own split and write them into it; the model file is
    left untouched."""
    bundle = load_bundle(settings.bundle, safeguards=False)
    metadata = bundle.metadata
    split = bundle_split(bundle, settings.data)
    train, validation = split_pixel_datasets(split, metadata.input_spec)
    real = read_real_outliers(settings.outliers, metadata.input_spec) if settings.outliers else None
    inputs = safeguard_inputs(bundle.model, metadata.positive_index, train, validation, real)
    gate, metadata.input_gate, metadata.uncertainty, drift = fit_safeguards_on(inputs, metadata.threshold)
    # The headline figures too, at the bundle's threshold and calibration, on its split as found now: a bundle
    # trained before one file per content was kept scored a byte-identical copy twice.
    metadata.metrics["validation"].update(classifier_stats.summary(inputs.is_cancer, inputs.p_cancer, metadata.threshold))
    metadata.metrics["validation_by"] = validation_breakdown(split.validation, inputs, metadata.threshold)
    if metadata.runtime is not None:
        logger.warning("%s: its runtime was validated against the safeguards replaced now; `skin-ray optimize` validates "
                       "it again, until then every command runs the Keras network", settings.bundle)
        metadata.runtime = None
    write_safeguards(metadata, gate, drift, settings.bundle)
    return metadata
