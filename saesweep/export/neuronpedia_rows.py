"""The rows of Neuronpedia's bulk import, field for field as SAEDashboard's exporter writes them
(sae_dashboard/neuronpedia/neuronpedia_export.py: its SourceRelease, Model, SourceSet, Source,
Feature and Activation dataclasses, serialized as their __dict__, datetimes in ISO format)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from saesweep.export.logit_effects import LogitEffects

DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
"""The creator id SAEDashboard's exporter falls back to (its FALLBACK_CREATOR_ID)."""


@dataclass(frozen=True)
class Release:
    """What every row of an export shares: who made it, for which model and source set."""

    model_id: str
    source_set: str
    release: str
    creator_id: str
    creator_name: str
    created_at: str


def release_row(r: Release, description: str) -> dict:
    return {
        "name": r.release, "description": description, "creatorName": r.creator_name,
        "creatorId": r.creator_id, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
        "descriptionShort": description, "urls": [], "creatorEmail": None,
        "creatorNameShort": r.creator_name, "defaultSourceSetName": None,
        "defaultSourceId": None, "defaultUmapSourceIds": [], "createdAt": r.created_at,
    }  # fmt: skip


def model_row(r: Release) -> dict:
    return {
        "id": r.model_id, "instruct": r.model_id.endswith("-it"), "creatorId": r.creator_id,
        "displayNameShort": r.model_id, "displayName": r.model_id, "tlensId": None,
        "dimension": None, "visibility": "PUBLIC", "defaultSourceSetName": None,
        "defaultSourceId": None, "inferenceEnabled": False, "layers": 0, "neuronsPerLayer": 0,
        "createdAt": r.created_at, "owner": "", "updatedAt": r.created_at, "website": None,
    }  # fmt: skip


def sourceset_row(r: Release, description: str) -> dict:
    return {
        "modelId": r.model_id, "name": r.source_set, "creatorId": r.creator_id,
        "hasDashboards": True, "visibility": "PUBLIC", "description": description, "type": "",
        "creatorName": r.creator_name, "urls": [], "creatorEmail": None,
        "releaseName": r.release, "defaultOfModelId": None, "defaultRange": 1,
        "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
        "showHeadAttribution": False, "showUmap": False, "createdAt": r.created_at,
    }  # fmt: skip


def source_row(r: Release, source_id: str, dataset: str, n_prompts: int, ctx_len: int) -> dict:
    return {
        "id": source_id, "modelId": r.model_id, "setName": r.source_set,
        "creatorId": r.creator_id, "hasDashboards": True, "inferenceEnabled": False,
        "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
        "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
        "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
        "hasUmapClusters": False, "num_prompts": n_prompts, "num_tokens_in_prompt": ctx_len,
        "dataset": dataset, "notes": None, "createdAt": r.created_at,
    }  # fmt: skip


@dataclass(frozen=True)
class FeatureData:
    """What saesweep knows of one latent for its Feature row."""

    index: int
    max_act: float
    density: float
    hist_values: list[float]
    hist_heights: list[int]
    logits: LogitEffects


def feature_row(r: Release, source_id: str, f: FeatureData) -> dict:
    """A Feature row; no correlations, neuron alignment or decoder weight distribution."""
    return {
        "modelId": r.model_id, "layer": source_id, "index": str(f.index),
        "creatorId": r.creator_id, "createdAt": r.created_at, "maxActApprox": f.max_act,
        "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": 10,
        "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [], "correlated_features_indices": [],
        "correlated_features_pearson": [], "correlated_features_l1": [],
        "neg_str": f.logits.neg_str, "neg_values": f.logits.neg_values,
        "pos_str": f.logits.pos_str, "pos_values": f.logits.pos_values,
        "frac_nonzero": f.density, "freq_hist_data_bar_heights": f.hist_heights,
        "freq_hist_data_bar_values": f.hist_values,
        "logits_hist_data_bar_heights": f.logits.hist_heights,
        "logits_hist_data_bar_values": f.logits.hist_values,
        "decoder_weights_dist": [], "sourceSetName": None,
    }  # fmt: skip


def activation_row(
    r: Release, source_id: str, index: int, tokens: list[str], values: list[float], at: int
) -> dict:
    """An Activation row of a top activating context (SAEDashboard's top group: bins -1,
    the largest activation, -1), `at` the top token."""
    top = max(values)
    return {
        "id": "c" + uuid.uuid4().hex[:24], "tokens": tokens, "index": str(index),
        "layer": source_id, "modelId": r.model_id, "maxValue": top,
        "maxValueTokenIndex": values.index(top), "minValue": min(values), "values": values,
        "creatorId": r.creator_id, "dataSource": None, "dataIndex": None, "dfaValues": [],
        "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": r.created_at,
        "lossValues": [], "logitContributions": None, "binMin": -1.0, "binMax": top,
        "binContains": -1.0, "qualifyingTokenIndex": at, "zIndices": None, "zValues": None,
    }  # fmt: skip
