"""Builders: config → model, criterion, post-processor."""

from __future__ import annotations

from replic.models.backbone import Backbone, Joiner
from replic.models.conditional_decoder import ConditionalDecoder
from replic.models.config import ModelConfig
from replic.models.criterion import SetCriterion
from replic.models.detector import Detector
from replic.models.matcher import HungarianMatcher
from replic.models.position_encoding import PositionEmbeddingSine
from replic.models.postprocess import PostProcess
from replic.models.transformer import Transformer, TransformerDecoder, TransformerEncoder


def build_model(cfg: ModelConfig) -> Detector:
    """Build a :class:`Detector` from ``cfg`` (``arch`` defaults filled in). Downloads nothing
    unless ``pretrained_backbone: torchvision`` and the weights are not in the torch hub cache."""
    cfg.validate()
    cfg = cfg.resolved()
    assert cfg.num_queries is not None  # resolved() fills every switch
    body = Backbone(cfg.backbone, train_backbone=cfg.train_backbone, dilation=cfg.dilation,
                    pretrained=cfg.pretrained_backbone, levels=tuple(cfg.backbone_levels),
                    channels_last=cfg.channels_last, input_level=cfg.input_level)
    backbone = Joiner(body, PositionEmbeddingSine(cfg.hidden_dim // 2, normalize=True))
    encoder = TransformerEncoder(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.enc_layers)
    if cfg.spatial_query == "none":
        decoder = TransformerDecoder(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.dec_layers,
                                     reference_point=cfg.reference_point if cfg.offset_regression else None,
                                     num_queries=cfg.num_queries)
    else:
        decoder = ConditionalDecoder(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.dec_layers,
                                     spatial_query=cfg.spatial_query, lambda_form=cfg.lambda_form,
                                     reference_point=cfg.reference_point, num_queries=cfg.num_queries)
    transformer = Transformer(encoder, decoder, cfg.hidden_dim, cfg.nheads)
    return Detector(backbone, transformer, num_classes=cfg.num_classes, num_queries=cfg.num_queries,
                    aux_loss=cfg.aux_loss, focal_loss=bool(cfg.focal_loss),
                    offset_regression=bool(cfg.offset_regression),
                    conditional_init=cfg.arch == "conditional_detr")


def build_matcher(cfg: ModelConfig) -> HungarianMatcher:
    cfg = cfg.resolved()
    c = cfg.criterion
    return HungarianMatcher(cost_class=c.cost_class, cost_bbox=c.cost_bbox, cost_giou=c.cost_giou,
                            focal=bool(cfg.focal_loss), focal_alpha=c.focal_alpha, focal_gamma=c.focal_gamma)


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    """SetCriterion with the matcher and weights of ``cfg.criterion`` (aux weights when aux_loss)."""
    cfg.validate()
    cfg = cfg.resolved()
    c = cfg.criterion
    weight_dict = {"loss_ce": c.cls_loss_coef, "loss_bbox": c.bbox_loss_coef, "loss_giou": c.giou_loss_coef}
    return SetCriterion(cfg.num_classes, build_matcher(cfg), weight_dict, focal=bool(cfg.focal_loss),
                        focal_alpha=c.focal_alpha, focal_gamma=c.focal_gamma, eos_coef=c.eos_coef,
                        num_aux=cfg.dec_layers - 1 if cfg.aux_loss else 0)


def build_postprocess(cfg: ModelConfig) -> PostProcess:
    """Top-``postprocess_topk`` post-processing matching the model's classification loss."""
    cfg = cfg.resolved()
    return PostProcess(topk=cfg.postprocess_topk, focal=bool(cfg.focal_loss))
