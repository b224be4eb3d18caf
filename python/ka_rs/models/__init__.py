"""ka_rs.models: DETR detectors (plain and anchor variants), backbones, presets.

Typical use::

    from ka_rs.models import build_model
    model = build_model("anchor_tiny", num_classes=4)
    out = model(images, mask)          # DetrOutput
    out.pred_logits, out.pred_boxes, out.aux_outputs, out.sequences, out.padding_mask
"""

from ka_rs.models.backbone import (
    BACKBONES,
    Backbone,
    FrozenBatchNorm2d,
    ResNet,
    SmallCNN,
    build_backbone,
)
from ka_rs.models.detr import DETR, VARIANTS, DetrConfig, DetrOutput, EncoderInput, postprocess
from ka_rs.models.position import PositionEmbeddingSine, box_sine_embedding
from ka_rs.models.presets import PRESETS, TRAINING_HINTS, build_model, preset_config
from ka_rs.models.student import (
    AmalgamationStudent,
    CompactAmalgamationStudent,
    build_student,
    slot_attention_mask,
    student_from_checkpoint,
)
from ka_rs.models.transformer import (
    MLP,
    AnchorDecoder,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    inverse_sigmoid,
)

__all__ = [
    "BACKBONES",
    "DETR",
    "MLP",
    "PRESETS",
    "TRAINING_HINTS",
    "VARIANTS",
    "AmalgamationStudent",
    "CompactAmalgamationStudent",
    "AnchorDecoder",
    "Backbone",
    "DetrConfig",
    "DetrOutput",
    "EncoderInput",
    "FrozenBatchNorm2d",
    "PositionEmbeddingSine",
    "ResNet",
    "SmallCNN",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "box_sine_embedding",
    "build_backbone",
    "build_model",
    "build_student",
    "inverse_sigmoid",
    "postprocess",
    "preset_config",
    "slot_attention_mask",
    "student_from_checkpoint",
]
