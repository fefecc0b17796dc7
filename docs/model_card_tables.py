"""The model card's tables, from a bundle's bundle.json: what `docs/model-card.md` holds between its markers, and
the real-image gate table README repeats between its own.

    python docs/model_card_tables.py [BUNDLE]          # prints them (default: the shipped bundle)
    python docs/model_card_tables.py --write [BUNDLE]  # replaces them in docs/model-card.md and README.md

Every figure is the bundle's own, recorded when it was made on its grouped validation split; a test holds the
card's and README's tables equal to this script's output for the shipped bundle, so neither can drift from the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from skin_ray.bundle import read_metadata

CARD = Path(__file__).with_name("model-card.md")
BEGIN, END = "<!-- tables: python docs/model_card_tables.py --write -->", "<!-- end of tables -->"
README = Path(__file__).parents[1] / "README.md"
README_BEGIN, README_END = "<!-- gate table: python docs/model_card_tables.py --write -->", "<!-- end of gate table -->"
SUBGROUPS = (("source", "Data tree"), ("diagnosis", "Diagnosis"), ("sex", "Sex"), ("age_band", "Age band"),
             ("site", "Body site"))
GATE_TARGETS = {"everyday_photos": 0.97, "medical_other": 0.97, "documents_charts": 0.97, "clinical_skin": 0.90}


def share(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else "")


def headline(metadata) -> list[str]:
    validation, rule = metadata.metrics["validation"], metadata.metrics["threshold_rule"]
    auc = share(validation["roc_auc"], validation["roc_auc_ci95"])
    return [
        "| Validation images | Cancer | ROC AUC (95% CI) | Threshold | Sensitivity | Specificity | ECE |",
        "|---:|---:|---|---:|---:|---:|---:|",
        f"| {validation['n']} | {validation['tp'] + validation['fn']} | {auc} | {metadata.threshold:.3f} "
        f"| {validation['sensitivity']:.3f} | {validation['specificity']:.3f} | {validation['ece']:.3f} |",
        "",
        f"The threshold keeps sensitivity >= {metadata.target_sensitivity} on new cases with confidence "
        f"{rule['confidence_reached']:.3f} (expected {share(rule['expected_sensitivity'], rule['sensitivity_ci95'])})"
        + (f"; lowered from {rule['lowered_from']:.3f} so that each data tree's own cancers reach the target too."
           if "lowered_from" in rule else "."),
    ]


def subgroup_table(name: str, title: str, groups: dict[str, dict], target: float) -> list[str]:
    lines = [f"| {title} | Images | Cancer | Sensitivity (95% CI) | Specificity (95% CI) | ROC AUC | |",
             "|---|---:|---:|---|---|---:|---|"]
    for value, figures in groups.items():
        label = Path(value).name if name == "source" else value
        sensitivity = figures["sensitivity"]
        flag = f"**below the {target} promise**" if sensitivity is not None and sensitivity < target else ""
        auc = "-" if figures["roc_auc"] is None else f"{figures['roc_auc']:.3f}"
        lines.append(
            f"| {label} | {figures['n']} | {figures['cancers']} | {share(sensitivity, figures['sensitivity_ci95'])} "
            f"| {share(figures['specificity'], figures['specificity_ci95'])} | {auc} | {flag} |"
        )
    return lines


def real_gate_table(metadata) -> list[str]:
    """The gate's figures on each kind of real image that is not dermoscopy, with its repositories left out."""
    lines = ["| Kind (real images) | Images | Repositories | Refused (95% CI) | Refused, its repository left out (95% CI) "
             "| Target |", "|---|---:|---:|---|---|---:|"]
    for kind, figures in metadata.input_gate["not_dermoscopy"].items():
        if "sources" not in figures:
            continue  # a generated kind: generated_gate_table
        name = kind.removesuffix(" (real)")
        target = GATE_TARGETS.get(name)
        lines.append(
            f"| {name} | {figures['n']} | {figures['sources']} | {share(figures['refused'], figures['refused_ci95'])} "
            f"| {share(figures['refused_left_out_source'], figures['refused_left_out_source_ci95'])} "
            f"| {'-' if target is None else f'>= {target}'} |"
        )
    return lines


def generated_gate_table(metadata) -> list[str]:
    lines = ["| Kind (generated) | Images | Refused | Refused, the kind left out |", "|---|---:|---:|---:|"]
    for kind, figures in metadata.input_gate["not_dermoscopy"].items():
        if "sources" not in figures:
            lines.append(f"| {kind} | {figures['n']} | {figures['refused']:.3f} | {figures['refused_left_out']:.3f} |")
    return lines


def tables(bundle: str | None = None) -> str:
    metadata = read_metadata(bundle)
    lines = ["### On the validation split", "", *headline(metadata)]
    for name, title in SUBGROUPS:
        groups = metadata.metrics.get("validation_by", {}).get(name)
        if groups:
            lines += ["", f"### By {title.lower()}", "", *subgroup_table(name, title, groups, metadata.target_sensitivity)]
    lines += ["", "### The input gate", "", *real_gate_table(metadata), "", *generated_gate_table(metadata)]
    return "\n".join(lines) + "\n"


def with_tables(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """`text` with what is between its markers replaced by `block`."""
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + block + text[stop:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="bundle directory (default: the shipped one)")
    parser.add_argument("--write", action="store_true", help="replace the tables in docs/model-card.md")
    args = parser.parse_args()
    block = tables(args.bundle)
    if args.write:
        CARD.write_text(with_tables(CARD.read_text(), block))
        gate = "\n".join(real_gate_table(read_metadata(args.bundle))) + "\n"
        README.write_text(with_tables(README.read_text(), gate, README_BEGIN, README_END))
    else:
        print(block, end="")


if __name__ == "__main__":
    main()
